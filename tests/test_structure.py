"""The shape of the code: no import circle among the package, callbacks/ and cli.py, and no class
or function so long that a reader cannot take it in (limits of the project's layout)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "omniquant_pl").rglob("*.py")), *sorted((ROOT / "callbacks").rglob("*.py")), ROOT / "cli.py"]
MAX_CLASS_LINES, MAX_FUNCTION_LINES, MAX_SEQUENCER_LINES = 300, 80, 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere (module level, functions, TYPE_CHECKING)."""
    modules = {module_name(path): path for path in SOURCES}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` names module a.b.c or a package above
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_callbacks_and_cli_import_no_circle():
    graph = import_graph()
    assert {"omniquant_pl.sequencer", "callbacks.perplexity", "cli"} <= graph.keys()
    assert "omniquant_pl.callback" in graph["callbacks.fuse"]  # the graph sees imports at all
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_definitions() -> list[str]:
    too_long = []
    for path in SOURCES:
        if path.parent.name == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)} {getattr(node, 'name', '')} ({lines} lines)"
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                too_long.append(where)
    return too_long


def test_no_class_over_300_lines_no_function_over_80_and_a_short_sequencer():
    assert _long_definitions() == []
    assert len((ROOT / "omniquant_pl" / "sequencer.py").read_text().splitlines()) <= MAX_SEQUENCER_LINES


def test_the_recorded_package_version_is_pyproject_s():
    import tomllib

    from omniquant_pl.versions import OMNIQUANT_PL_VERSION

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == OMNIQUANT_PL_VERSION
