"""Run checkpoints: after every block, what is needed to continue at the next one.

`<output_dir>/learned_params.safetensors` holds the learned parameters of finished blocks and
`<output_dir>/checkpoint.json` the config, its hash and the results so far. Both are written
atomically, parameters first: a crash at any moment leaves a consistent pair (at worst the
parameter file holds one block more than the json counts, which is recomputed identically).
Every block reseeds torch from (seed, block index), so no RNG state has to be carried.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from omniquant_pl.config import RunConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.io import atomic_save_safetensors, atomic_write_json

CHECKPOINT = "checkpoint.json"
LEARNED = "learned_params.safetensors"
# Parts of the config that change the learned parameters; eval/output settings may differ.
HASHED_SECTIONS = ("model", "quant", "calib", "train")
# Settings that change speed or logging, not results: a resumed run may change them.
UNHASHED_TRAIN = ("compile", "cache_device", "cuda_graph", "steps_per_call", "logger")
# Options added after checkpoints existed: left out of the identity at their default, so a run
# checkpointed before an option existed still resumes.
LATER_DEFAULTS = {"quant": {"grid": "minmax"}}


def config_identity(config: RunConfig) -> dict[str, Any]:
    identity = {section: asdict(getattr(config, section)) for section in HASHED_SECTIONS}
    for name in UNHASHED_TRAIN:
        identity["train"].pop(name, None)
    for section, defaults in LATER_DEFAULTS.items():
        for name, default in defaults.items():
            if identity[section].get(name) == default:
                identity[section].pop(name)
    return identity


def config_hash(config: RunConfig) -> str:
    payload = json.dumps(config_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def write_checkpoint(output_dir: Path, config: RunConfig, results: dict, learned: dict[str, torch.Tensor]) -> None:
    atomic_save_safetensors(learned, output_dir / LEARNED, {"quant": config.quant.tag})
    state = {
        "config_hash": config_hash(config),
        "config_identity": config_identity(config),
        "finished_blocks": len(results["blocks"]),
        "results": results,
    }
    atomic_write_json(state, output_dir / CHECKPOINT)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def load_checkpoint(output_dir: Path, config: RunConfig) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(results so far, learned parameters) of a compatible checkpoint, None if there is none."""
    path = output_dir / CHECKPOINT
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["config_hash"] != config_hash(config):
        diffs = _differences(state.get("config_identity", {}), config_identity(config))
        raise OmniQuantError(
            f"cannot resume {output_dir}: it was calibrated with a different config "
            f"({'; '.join(diffs[:4]) or 'unknown differences'}); use the original config or a new output_dir"
        )
    from safetensors.torch import load_file

    learned = load_file(output_dir / LEARNED) if (output_dir / LEARNED).is_file() else {}
    return state["results"], learned


def existing_progress(output_dir: Path) -> int:
    path = output_dir / CHECKPOINT
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text()).get("finished_blocks", 0))
    except (ValueError, OSError):
        return 0


def block_state(learned: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{index}."
    return {k[len(prefix):]: v for k, v in learned.items() if k.startswith(prefix)}
