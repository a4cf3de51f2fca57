"""Progress over blocks × epochs with the current loss: rich on a terminal, plain lines elsewhere."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omniquant_pl.hooks import CalibrationCallback


class ProgressCallback(CalibrationCallback):
    rank_zero_only = True  # data-parallel runs: rank 0 alone prints

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self._rich_handler = None  # routes log records above the live bar (see _route_logging_through)
        self._replaced: list = []  # the stream handlers it stands in for

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
            self._route_logging_through(self.console)  # before start(): rich then redirects sys.stderr
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
        # blocks are numbered from 0 everywhere (results.json, warnings, logs/block_XXX, plots)
        line = f"block {index} ({index + 1} of {self.n_blocks}):{losses} ({seconds:.1f} s)"
        if self.progress:
            self.progress.update(self.blocks_task, advance=1, info=f"last {seconds:.1f} s")
            self.progress.console.print(line)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_calibration_end(self, sequencer, results) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        self._restore_logging()

    def _route_logging_through(self, console: Console) -> None:
        """While the bar is live, log records print above it (rich) instead of gluing onto it."""
        import logging

        from rich.logging import RichHandler

        root = logging.getLogger()
        self._replaced = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                          and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
        if not self._replaced:
            return
        self._rich_handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
        self._rich_handler.setLevel(min(h.level for h in self._replaced))
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self._rich_handler)

    def _restore_logging(self) -> None:
        import logging

        root = logging.getLogger()
        if self._rich_handler is not None:
            root.removeHandler(self._rich_handler)
            for handler in self._replaced:
                root.addHandler(handler)
            self._rich_handler = None
