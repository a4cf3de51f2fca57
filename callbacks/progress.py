"""Progress over blocks × epochs with the current loss: rich on a terminal, plain lines elsewhere."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omniquant_pl.hooks import CalibrationCallback


class ProgressCallback(CalibrationCallback):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def on_calibration_start(self, sequencer) -> None:
        self.n_blocks = len(sequencer.blocks)
        self.epochs = sequencer.config.train.epochs
        if self.interactive:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.blocks_task = self.progress.add_task("blocks", total=self.n_blocks, info="")
            self.epochs_task = self.progress.add_task("epochs", total=max(self.epochs, 1), info="")

    def on_block_start(self, sequencer, index, module) -> None:
        self.block_started = time.perf_counter()
        if self.progress:
            self.progress.reset(self.epochs_task, total=max(self.epochs, 1), info=f"block {index}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.progress:
            # Lightning calls callbacks before the module's own hook: read the running mean.
            loss = pl_module.current_epoch_loss()
            self.progress.update(self.epochs_task, advance=1, info=f"block {pl_module.index} loss {loss:.5g}")

    def on_block_end(self, sequencer, index, metrics) -> None:
        seconds = metrics.get("seconds", 0.0)
        losses = ""
        if "final_loss" in metrics:
            losses = f" rtn {metrics['rtn_loss']:.5g} -> init {metrics['init_loss']:.5g} -> final {metrics['final_loss']:.5g}"
        line = f"block {index + 1}/{self.n_blocks}:{losses} ({seconds:.1f} s)"
        if self.progress:
            self.progress.update(self.blocks_task, advance=1, info=f"last {seconds:.1f} s")
            self.progress.console.print(line)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_calibration_end(self, sequencer, results) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
