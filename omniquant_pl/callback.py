"""The calibration callback base class, and what a callback sees of the run.

A `CalibrationCallback` is also a Lightning `Callback`: the sequencer passes it to every block's
Trainer, so one class can react both to blocks (these hooks) and to steps/epochs (Lightning's).
Callbacks see the run through `CalibrationRun`, the few attributes the sequencer promises; this
module imports neither the sequencer nor any callback, so callbacks import it freely.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    import torch
    from torch import nn

    from omniquant_pl.arch.base import ArchSpec
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.config import RunConfig
    from omniquant_pl.plan import RunPlan
    from omniquant_pl.results import BlockResult, RunResults
    from omniquant_pl.streaming.blocks import StreamedBlocks


class CalibrationRun(Protocol):
    """What the sequencer shows its callbacks (read these; write only to `results`)."""

    config: RunConfig
    plan: RunPlan  # every ``auto`` resolved: device, precision, compile, caches, ...
    results: RunResults  # typed; written to results.json after each block and at the end
    output_dir: Path
    model: nn.Module
    tokenizer: Any
    spec: ArchSpec
    blocks: list[nn.Module]
    streamed: StreamedBlocks | None  # model.streaming: blocks read from disk one at a time, else None

    @property
    def device(self) -> torch.device: ...


class CalibrationCallback(Callback):
    """Override any of these; the default does nothing.

    In a data-parallel run (torchrun) the sequencer calls these hooks on every process, or, with
    `rank_zero_only`, on rank 0 alone (evaluation, printing, plots: work whose result only rank 0
    records) while the others wait. Lightning's own hooks run on every process either way.
    """

    rank_zero_only: bool = False

    def check_config(self, config: RunConfig) -> None:
        """Refuse (raise a one-line OmniQuantError) a run this callback cannot serve, before the model loads."""

    def on_calibration_start(self, run: CalibrationRun) -> None:
        """Model loaded, nothing calibrated yet."""

    def on_block_start(self, run: CalibrationRun, index: int, module: BlockModule) -> None:
        """Block `index` is built with its targets cached; its Trainer is about to fit."""

    def on_block_fit_end(self, run: CalibrationRun, index: int, module: BlockModule) -> None:
        """Training of block `index` is over; the learned parameters are still separate."""

    def on_block_end(self, run: CalibrationRun, index: int, metrics: BlockResult) -> None:
        """Block `index` is fused, its outputs propagated, its checkpoint written."""

    def on_calibration_end(self, run: CalibrationRun, results: RunResults) -> None:
        """Every block is done; `results` will be written to results.json after this."""

    def on_run_end(self, run: CalibrationRun, results: RunResults) -> None:
        """The model is saved (save_model) and results.json written; what is added to `results` now is
        written again after this (exports, checks of the saved files)."""
