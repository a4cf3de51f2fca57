"""`omniquant compare`: one table across runs (eval.json of `omniquant evaluate` or results.json of
`omniquant calibrate`), as a rich table, a markdown table and a bar chart."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omniquant_pl.errors import ConfigError

log = logging.getLogger(__name__)

REPORT_FILES = ("eval.json", "results.json")  # a run directory: evaluate's report first
FP_TAG = "W16A16"
MB = 1e6


@dataclass
class Row:
    run: str
    method: str
    bits: str
    perplexity: dict[str, dict] = field(default_factory=dict)  # dataset -> {ppl, windows, seqlen}
    zeroshot: dict[str, dict] = field(default_factory=dict)  # task -> {acc, acc_norm, samples}
    disk_bytes: int | None = None
    packed_bytes: int | None = None


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{path}' is not valid JSON ({err})") from err
    if not isinstance(report, dict) or "perplexity" not in report:
        raise ConfigError(f"'{path}' is not an omniquant report (no 'perplexity' key)")
    return report


def load_reports(run: str) -> tuple[str, list[dict]]:
    """(run name, reports) of a run directory (its eval.json and results.json, in that order) or
    of one report .json file."""
    path = Path(run)
    if path.is_dir():
        found = [path / name for name in REPORT_FILES if (path / name).is_file()]
        if not found:
            raise ConfigError(f"run '{run}' has neither {' nor '.join(REPORT_FILES)}; give an omniquant output "
                              "directory or an eval.json written by omniquant evaluate --output")
        return path.name, [_read_report(p) for p in found]
    if not path.is_file():
        raise ConfigError(f"run '{run}' does not exist; give an omniquant output directory or an eval.json file")
    name = path.parent.name if path.name in REPORT_FILES else path.stem
    return name, [_read_report(path)]



def rows_of(name: str, report: dict) -> list[Row]:
    """One row per method of a report; results.json (calibrate) and eval.json (evaluate) alike."""
    methods = list(dict.fromkeys([*report.get("methods", {}), *report["perplexity"], *report.get("zeroshot", {})]))
    model_dir = Path(report["saved_model"]) if report.get("saved_model") else None
    rows = []
    for method in methods:
        info = report.get("methods", {}).get(method, {})
        bits = info.get("bits") or (FP_TAG if method == "fp" else report.get("quant_tag", "?"))
        disk = info.get("disk_bytes")
        if disk is None and method == "omniquant" and model_dir is not None:
            from omniquant_pl.eval.size import disk_bytes

            disk = disk_bytes(model_dir)
        rows.append(Row(name, method, bits, report["perplexity"].get(method, {}),
                        report.get("zeroshot", {}).get(method, {}), disk, info.get("packed_bytes")))
    return rows


METHOD_ORDER = ("fp", "rtn", "omniquant")  # a run's rows: its baselines first, then the quantized model


def _merged(rows: list[Row], newer: Row) -> None:
    """Add `newer` (a later report's row) to `rows`: into the row of the same method, where its
    datasets, tasks and sizes replace the older ones and the older report's others stay."""
    older = next((row for row in rows if row.method == newer.method), None)
    if older is None:
        rows.append(newer)
        return
    older.bits = newer.bits
    older.perplexity.update(newer.perplexity)
    older.zeroshot.update(newer.zeroshot)
    older.disk_bytes = newer.disk_bytes if newer.disk_bytes is not None else older.disk_bytes
    older.packed_bytes = newer.packed_bytes if newer.packed_bytes is not None else older.packed_bytes


def collect(runs: list[str]) -> list[Row]:
    """One row per run and method: a run directory's results.json (calibrate: its FP, RTN and
    OmniQuant rows) with its eval.json (evaluate, later) merged in, datasets evaluated again replaced."""
    if not runs:
        raise ConfigError("give at least one run: omniquant compare outputs/run1 outputs/run2/eval.json ...")
    names: dict[str, int] = {}
    rows = []
    for run in runs:
        name, reports = load_reports(run)
        names[name] = names.get(name, 0) + 1
        label = name if names[name] == 1 else f"{name}#{names[name]}"
        run_rows: list[Row] = []
        for report in reversed(reports):  # results.json first, then eval.json on top of it
            for row in rows_of(label, report):
                _merged(run_rows, row)
        order = {method: i for i, method in enumerate(METHOD_ORDER)}
        rows += sorted(run_rows, key=lambda row: order.get(row.method, len(order)))
    return rows


def _shape(result: dict) -> tuple[int | None, int | None]:
    return result.get("windows"), result.get("seqlen")


def perplexity_columns(rows: list[Row]) -> list[tuple[str, tuple[int | None, int | None]]]:
    """(dataset, (windows, seqlen)) per column: perplexities over other windows are other numbers,
    so each evaluation shape of a dataset gets its own column."""
    return list(dict.fromkeys((d, _shape(r.perplexity[d])) for r in rows for d in r.perplexity))


def _column_name(dataset: str, shape: tuple[int | None, int | None]) -> str:
    windows, seqlen = shape
    return f"{dataset} ppl" + (f" ({windows}×{seqlen})" if windows is not None else "")


def _ppl(row: Row, dataset: str, shape: tuple) -> float | None:
    result = row.perplexity.get(dataset)
    return result["ppl"] if result is not None and _shape(result) == shape else None


def _samples(rows: list[Row], task: str) -> str:
    counts = {r.zeroshot[task].get("samples") for r in rows if task in r.zeroshot}
    return f" (n={counts.pop()})" if len(counts) == 1 and None not in counts else ""


def columns(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: run, bits, method, each dataset's ppl, each task's acc/acc_norm (%), sizes (MB)."""
    ppl_columns = perplexity_columns(rows)
    tasks = list(dict.fromkeys(t for r in rows for t in r.zeroshot))
    header = ["run", "bits", "method"]
    header += [_column_name(d, shape) for d, shape in ppl_columns]
    for task in tasks:
        header += [f"{task} acc %{_samples(rows, task)}", f"{task} acc_norm %"]
    header += ["disk MB", "packed MB (est.)"]
    body = []
    for r in rows:
        cells = [r.run, r.bits, r.method]
        cells += ["-" if (v := _ppl(r, d, shape)) is None else f"{v:.2f}" for d, shape in ppl_columns]
        for task in tasks:
            result = r.zeroshot.get(task, {})
            for metric in ("acc", "acc_norm"):
                value, err = result.get(metric), result.get(f"{metric}_stderr")
                cells.append("-" if value is None else f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err else ""))
        cells += [f"{b / MB:.1f}" if b else "-" for b in (r.disk_bytes, r.packed_bytes)]
        body.append(cells)
    return header, body


def rich_table(rows: list[Row], title: str = "comparison"):
    from rich.table import Table

    header, body = columns(rows)
    table = Table(title=title)
    for i, name in enumerate(header):  # run names are never cut: they fold onto a second line
        table.add_column(name, justify="left" if i < 3 else "right", overflow="fold", min_width=len(name) if i else None)
    for cells in body:
        table.add_row(*cells)
    return table


def markdown_table(rows: list[Row]) -> str:
    header, body = columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[Row], path: Path) -> bool:
    """One panel per dataset (ppl, log scale) and per task (acc, acc_norm); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install matplotlib)", path)
        return False
    tasks = list(dict.fromkeys(t for r in rows for t in r.zeroshot))
    panels = [(f"{_column_name(d, shape)} (lower is better)", [_ppl(r, d, shape) for r in rows], True)
              for d, shape in perplexity_columns(rows)]
    panels += [(f"{t} {m} (higher is better)", [r.zeroshot.get(t, {}).get(m) for r in rows], False)
               for t in tasks for m in ("acc", "acc_norm")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.2 * len(rows) + 2), 3.2 * len(panels)), squeeze=False)
    short = [f"{r.method}\n{r.bits}" for r in rows]
    labels = [label if short.count(label) == 1 else f"{label}\n{r.run}" for label, r in zip(short, rows)]
    for ax, (title, values, log_scale) in zip(axes[:, 0], panels):
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(range(len(rows)), heights, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        if log_scale and all(h > 0 for h in heights):
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate("-" if v is None else f"{v:.3g}", (i, heights[i]), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(runs: list[str], output: str | Path | None = None) -> tuple[list[Row], dict[str, Path]]:
    """Rows of all runs; with `output`, writes comparison.md, comparison.json and comparison.png there."""
    if output is not None:
        from omniquant_pl.io import check_writable_dir

        check_writable_dir(output, "--output")
    rows = collect(runs)
    written: dict[str, Path] = {}
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(markdown_table(rows))
        (out / "comparison.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
        written = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
        if bar_chart(rows, out / "comparison.png"):
            written["chart"] = out / "comparison.png"
    return rows, written
