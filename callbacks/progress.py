"""Progress of the whole run: one bar over every block's epochs (its ETA averaged over the run), the
current block and loss, and a bar per evaluated dataset; rich on a terminal, plain lines elsewhere."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omniquant_pl.callback import CalibrationCallback

# the ETA averages over this many seconds of progress, not rich's default 30 (a block's epoch can take longer)
ETA_WINDOW_SECONDS = 3600


class ProgressCallback(CalibrationCallback):
    rank_zero_only = True  # data-parallel runs: rank 0 alone prints

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.calibration_task = None
        self.evaluation_task_id = None
        self._rich_handler = None  # routes log records above the live bar (see _route_logging_through)
        self._replaced: list = []  # the stream handlers it stands in for

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def _live(self) -> Progress | None:
        """The rich display, started on first use (the baselines' evaluation may come first)."""
        if self.progress is None and self.interactive:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                speed_estimate_period=ETA_WINDOW_SECONDS)
            self._route_logging_through(self.console)  # before start(): rich then redirects sys.stderr
            self.progress.start()
        return self.progress

    def evaluation_task(self, description: str) -> Callable[[int, int], None]:
        """A bar for one evaluation (PerplexityCallback's progress); returns its on_batch(done, total)."""
        progress = self._live()
        if progress is None:
            return lambda done, total: None
        if self.evaluation_task_id is None:
            self.evaluation_task_id = progress.add_task(description, total=None, info="windows")
        else:
            progress.reset(self.evaluation_task_id, description=description, total=None, visible=True)

        def on_batch(done: int, total: int) -> None:
            progress.update(self.evaluation_task_id, completed=done, total=total)

        return on_batch

    def on_calibration_start(self, run) -> None:
        self.n_blocks = len(run.blocks)
        self.epochs = max(run.config.train.epochs, 1)
        finished = run.results.finished_blocks
        progress = self._live()
        if progress is not None:
            if self.evaluation_task_id is not None:
                progress.update(self.evaluation_task_id, visible=False)
            self.calibration_task = progress.add_task("calibration (epochs of all blocks)",
                                                      total=self.n_blocks * self.epochs, info="",
                                                      completed=finished * self.epochs)

    def on_block_start(self, run, index, module) -> None:
        self.block_started = time.perf_counter()
        self.block_epochs_done = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None and trainer.num_training_batches:  # a smooth bar and ETA within epochs
            self.progress.advance(self.calibration_task, 1 / trainer.num_training_batches)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.progress is not None:
            # Lightning calls callbacks before the module's own hook: read the running mean.
            loss = pl_module.current_epoch_loss()
            self.block_epochs_done += 1
            done = (pl_module.index * self.epochs) + self.block_epochs_done
            self.progress.update(self.calibration_task, completed=done,
                                 info=f"block {pl_module.index} loss {loss:.5g}")

    def on_block_end(self, run, index, metrics) -> None:
        losses = ""
        if metrics.final_loss is not None:
            losses = f" rtn {metrics.rtn_loss:.5g} -> init {metrics.init_loss:.5g} -> final {metrics.final_loss:.5g}"
        # blocks are numbered from 0 everywhere (results.json, warnings, logs/block_XXX, plots)
        line = f"block {index} ({index + 1} of {self.n_blocks}):{losses} ({metrics.seconds:.1f} s)"
        if self.progress is not None:
            self.progress.update(self.calibration_task, completed=(index + 1) * self.epochs)
            self.progress.console.print(line)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_calibration_end(self, run, results) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._restore_logging()

    def _route_logging_through(self, console: Console) -> None:
        """While the bar is live, log records print above it (rich) instead of gluing onto it."""
        from rich.logging import RichHandler

        root = logging.getLogger()
        self._replaced = [h for h in root.handlers if type(h) is logging.StreamHandler
                          and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
        if not self._replaced:
            return
        self._rich_handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
        self._rich_handler.setLevel(min(h.level for h in self._replaced))
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self._rich_handler)

    def _restore_logging(self) -> None:
        root = logging.getLogger()
        if self._rich_handler is not None:
            root.removeHandler(self._rich_handler)
            for handler in self._replaced:
                root.addHandler(handler)
            self._rich_handler = None
