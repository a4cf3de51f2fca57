"""Fold the learned quantization parameters of a block into plain modules after training."""
from __future__ import annotations

from omniquant_pl.callback import CalibrationCallback


class FuseCallback(CalibrationCallback):
    """After a block's Trainer finishes: QuantLinear -> nn.Linear with fake-quantized weights."""

    def on_block_fit_end(self, run, index, module) -> None:
        module.fuse()
