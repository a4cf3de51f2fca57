"""Run checkpoints: after every block, what is needed to continue at the next one.

`<output_dir>/learned/block_XXX.safetensors` holds one finished block's learned parameters and
`<output_dir>/checkpoint.json` the config, its hash and the results so far. Both are written
atomically, the block's parameters first: a crash at any moment leaves a consistent state (at
worst a parameter file for a block the json does not count yet, which is recomputed
identically). Each block's file is written once, so a checkpoint costs one block's bytes, not the
whole model's. At the end the run writes all of them together as `learned_params.safetensors`.
Checkpoints written before per-block files (one `learned_params.safetensors`) still resume.
A checkpoint that cannot be read is refused, never overwritten.
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
from omniquant_pl.results import RunResults

CHECKPOINT = "checkpoint.json"
LEARNED = "learned_params.safetensors"  # all blocks, written when the run ends (and by older versions)
LEARNED_DIR = "learned"  # learned/block_XXX.safetensors, one per finished block
# Parts of the config that change the learned parameters; eval/output settings may differ.
HASHED_SECTIONS = ("model", "quant", "calib", "train")
# Settings that change speed, memory or logging, not results: a resumed run may change them.
UNHASHED_TRAIN = ("compile", "cache_device", "cuda_graph", "steps_per_call", "logger")
UNHASHED_MODEL = ("streaming",)
# Options added after checkpoints existed, with the value that older runs used: left out of the
# identity at that value, so a run checkpointed before the option existed still resumes.
LATER_DEFAULTS = {"quant": {"grid": "minmax", "let_up_down": False, "rounding": False, "train_weights": False,
                            "rotate": "none", "rotate_seed": 0, "rotate_online": "none", "gguf_type": None,
                            "lwc_search": False},
                  "train": {"shuffle_seed": None, "rounding_lr": 5e-3, "weight_lr": 1e-5,
                            "rounding_optimizer": "adamw"}}
# Options that change nothing unless another one is on: left out of the identity then.
ONLY_WITH = {"quant": {"let_up_down": "let"}, "train": {"shuffle_seed": "shuffle"}}


def config_identity(config: RunConfig) -> dict[str, Any]:
    identity = {section: asdict(getattr(config, section)) for section in HASHED_SECTIONS}
    for name in UNHASHED_TRAIN:
        identity["train"].pop(name, None)
    for name in UNHASHED_MODEL:
        identity["model"].pop(name, None)
    for section, options in ONLY_WITH.items():
        for name, needed in options.items():
            if not identity[section].get(needed):
                identity[section].pop(name, None)
    for section, defaults in LATER_DEFAULTS.items():
        for name, default in defaults.items():
            if name in identity[section] and identity[section][name] == default:
                identity[section].pop(name)
    return identity


def config_hash(config: RunConfig) -> str:
    payload = json.dumps(config_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def learned_block_path(output_dir: Path, index: int) -> Path:
    return Path(output_dir) / LEARNED_DIR / f"block_{index:03d}.safetensors"


def write_checkpoint(output_dir: Path, config: RunConfig, results: RunResults, index: int,
                     block_learned: dict[str, torch.Tensor]) -> None:
    """Count block `index` as finished: its parameters (names relative to the block) first."""
    atomic_save_safetensors(block_learned, learned_block_path(output_dir, index), {"quant": config.quant.tag})
    state = {
        "config_hash": config_hash(config),
        "config_identity": config_identity(config),
        "finished_blocks": results.finished_blocks,
        "results": results.to_dict(),
    }
    atomic_write_json(state, output_dir / CHECKPOINT)


def write_learned(output_dir: Path, config: RunConfig, learned: dict[str, torch.Tensor]) -> None:
    """All blocks' parameters in one file (``layers.<i>.<name>``), for users and tools."""
    atomic_save_safetensors(learned, output_dir / LEARNED, {"quant": config.quant.tag})


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


def _start_over_hint(output_dir: Path) -> str:
    return f"restore it, or move {output_dir} aside (or choose another output_dir) to start over"


def read_checkpoint_state(output_dir: Path) -> dict | None:
    """checkpoint.json's content, None if there is none; an unreadable one is refused."""
    path = Path(output_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["finished_blocks"]), state["config_hash"], state["results"]["blocks"]
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
        raise OmniQuantError(
            f"{path} is damaged ({type(err).__name__}: {str(err)[:80]}); it was left untouched: "
            + _start_over_hint(output_dir)
        ) from None
    return state


def _load_learned(output_dir: Path, finished: int) -> dict[str, torch.Tensor]:
    """Learned parameters of blocks 0..finished-1 as ``layers.<i>.<name>``; refuses missing or damaged files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (output_dir / LEARNED_DIR).is_dir() and (output_dir / LEARNED).is_file():  # an older checkpoint
        files = {None: output_dir / LEARNED}
    else:
        files = {index: learned_block_path(output_dir, index) for index in range(finished)}
    learned: dict[str, torch.Tensor] = {}
    for index, path in files.items():
        if not path.is_file():
            raise OmniQuantError(f"{path} is missing although {CHECKPOINT} counts block {index} as finished; "
                                 + _start_over_hint(output_dir))
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise OmniQuantError(f"{path} is damaged ({str(err)[:80]}); " + _start_over_hint(output_dir)) from None
        prefix = "" if index is None else f"layers.{index}."
        learned.update({prefix + name: value for name, value in tensors.items()})
    return learned


def load_checkpoint(output_dir: Path, config: RunConfig) -> tuple[RunResults, dict[str, torch.Tensor]] | None:
    """(results so far, learned parameters) of a compatible checkpoint, None if there is none."""
    output_dir = Path(output_dir)
    state = read_checkpoint_state(output_dir)
    if state is None:
        return None
    if state["config_hash"] != config_hash(config):
        diffs = _differences(state.get("config_identity", {}), config_identity(config))
        raise OmniQuantError(
            f"cannot resume {output_dir}: it was calibrated with a different config "
            f"({'; '.join(diffs[:4]) or 'unknown differences'}); use the original config or a new output_dir"
        )
    return RunResults.from_dict(state["results"]), _load_learned(output_dir, int(state["finished_blocks"]))


def existing_progress(output_dir: Path) -> int:
    """Finished blocks of the checkpoint in output_dir (0 without one); a damaged one is refused."""
    state = read_checkpoint_state(output_dir)
    return 0 if state is None else int(state["finished_blocks"])


def block_state(learned: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{index}."
    return {k[len(prefix):]: v for k, v in learned.items() if k.startswith(prefix)}
