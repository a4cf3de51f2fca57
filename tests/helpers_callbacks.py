"""Callbacks named by class path in the YAML configs of tests (imported by a subprocess)."""
from __future__ import annotations

import time
from pathlib import Path

from omniquant_pl import CalibrationCallback


class PauseInBlock(CalibrationCallback):
    """After the first epoch of block `block`, write `marker` and sleep (to be killed there)."""

    def __init__(self, block: int, marker: str, seconds: float = 300.0) -> None:
        self.block, self.marker, self.seconds = block, Path(marker), seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.index == self.block and trainer.current_epoch == 0:
            self.marker.write_text("paused")
            time.sleep(self.seconds)


class RecordBlocks(CalibrationCallback):
    """Append each finished block's index and final loss to a file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_block_end(self, sequencer, index, metrics) -> None:
        with self.path.open("a") as handle:
            handle.write(f"{index} {metrics.final_loss:.6g}\n")
