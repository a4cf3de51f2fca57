"""Per-token dynamic asymmetric activation quantizer (no learnable state)."""
from __future__ import annotations

import torch
from torch import nn

from omniquant_pl.quant.fake_quant import fake_quantize_rows
from omniquant_pl.quant.primitives import QuantGrid


class PerTokenActQuantizer(nn.Module):
    """Fake-quantizes each token (row over the last dimension) with its own min-max range.

    Rounding uses the STE, so gradients flow to whatever produced the activation (LET scales).
    """

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.grid = QuantGrid(bits, symmetric)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        # asymmetric (minmax_asym): the range always holds 0, so padding/zero activations stay exact
        return fake_quantize_rows(x, None, None, self.grid.qmin, self.grid.qmax, self.grid.rule)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, per-token, {'sym' if self.grid.symmetric else 'asym'}"
