"""torchrun entry of tests/test_distributed.py: `omniquant calibrate --config C` for each config
given, in one process per rank, recording every file-system write under WATCHED (Python's audit
events: open for writing, mkdir, rename/replace, remove) to RECORD_DIR/writes_rank<R>.json.

    PYTHONPATH=.:tests torchrun --standalone --nproc_per_node 2 tests/distributed_entry.py WATCHED RECORD_DIR C1 [C2 ...]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from omniquant_pl.callback import CalibrationCallback

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "shutil.rmtree",
                "os.truncate", "os.chmod"}


def record_writes_under(watched: Path, writes: list[list[str]]) -> None:
    watched = str(watched.resolve())

    def under(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(watched)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            if writing and under(path):
                writes.append([event, os.fspath(path)])
        elif event in WRITE_EVENTS and args and under(args[0]):
            writes.append([event, os.fspath(args[0])])

    sys.addaudithook(hook)


class TrainedStatePerRank(CalibrationCallback):
    """Saves each block's trained parameters (end of its last fit) as RECORD_DIR/trained_rank<R>.pt,
    from every process: with all-reduced gradients they are the same on every rank."""

    def __init__(self, record_dir: str) -> None:
        self.path = Path(record_dir) / f"trained_rank{os.environ.get('RANK', '0')}.pt"
        self.trained: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.trained.update({f"layers.{pl_module.index}.{k}": v for k, v in pl_module.learned_state().items()})
        torch.save(self.trained, self.path)


def main() -> int:
    watched, record_dir, configs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    import cli

    writes: list[list[str]] = []
    record_writes_under(watched, writes)
    codes = [cli.main(["calibrate", "--config", config]) for config in configs]
    rank = os.environ.get("RANK", "0")
    (record_dir / f"writes_rank{rank}.json").write_text(json.dumps(writes))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
