"""Sequencer-level callbacks: hooks around the whole run and around each block.

A `CalibrationCallback` is also a Lightning `Callback`: the sequencer passes it to every block's
Trainer, so one class can react both to blocks (these hooks) and to steps/epochs (Lightning's).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.sequencer import BlockSequencer


class CalibrationCallback(Callback):
    """Override any of these; the default does nothing.

    In a data-parallel run (torchrun) the sequencer calls these hooks on every process, or, with
    `rank_zero_only`, on rank 0 alone (evaluation, printing, plots: work whose result only rank 0
    records) while the others wait. Lightning's own hooks run on every process either way.
    """

    rank_zero_only: bool = False

    def on_calibration_start(self, sequencer: BlockSequencer) -> None:
        """Model loaded, nothing calibrated yet."""

    def on_block_start(self, sequencer: BlockSequencer, index: int, module: BlockModule) -> None:
        """Block `index` is built with its targets cached; its Trainer is about to fit."""

    def on_block_fit_end(self, sequencer: BlockSequencer, index: int, module: BlockModule) -> None:
        """Training of block `index` is over; the learned parameters are still separate."""

    def on_block_end(self, sequencer: BlockSequencer, index: int, metrics: dict[str, Any]) -> None:
        """Block `index` is fused, its outputs propagated, its checkpoint written."""

    def on_calibration_end(self, sequencer: BlockSequencer, results: dict[str, Any]) -> None:
        """Every block is done; `results` will be written to results.json after this."""
