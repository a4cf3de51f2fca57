"""The software stack a result was produced with, recorded in every results file.

`software_versions()` names the interpreter and the libraries whose versions change what a run
computes (torch's kernels, transformers' model code, Lightning's loop), so a results file can be
traced to its stack, and a resumed run can say when the stack changed under it.
"""
from __future__ import annotations

import platform
from importlib import metadata

OMNIQUANT_PL_VERSION = "0.1.0"  # pyproject.toml's version (a test keeps them equal)
# Distributions whose versions shape a result; the optional ones are recorded when installed.
CORE = ("torch", "transformers", "lightning")
OPTIONAL = ("compressed-tensors", "gguf", "llama-cpp-python", "lm-eval")


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def software_versions(optional: tuple[str, ...] = ()) -> dict[str, str]:
    """{"python", "omniquant-pl", torch, transformers, lightning[, each installed `optional`]}."""
    versions = {"python": platform.python_version(), "omniquant-pl": OMNIQUANT_PL_VERSION}
    for name in CORE:
        versions[name] = _installed(name) or "not installed"
    for name in optional:
        found = _installed(name)
        if found is not None:
            versions[name] = found
    return versions


def changed_versions(recorded: dict[str, str] | None, current: dict[str, str] | None = None) -> list[str]:
    """`name recorded -> current` for each core library whose version differs from a recorded stack
    (empty when nothing was recorded: files written before versions were)."""
    if not recorded:
        return []
    current = software_versions() if current is None else current
    return [f"{name} {recorded[name]} -> {current.get(name)}" for name in ("python", *CORE)
            if name in recorded and recorded[name] != current.get(name)]
