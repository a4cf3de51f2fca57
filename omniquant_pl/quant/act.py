"""Per-token dynamic asymmetric activation quantizer (no learnable state)."""
from __future__ import annotations

import torch
from torch import nn

from omniquant_pl.quant.primitives import QuantGrid, fake_quantize


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
        rows = x.float()
        xmax = rows.amax(dim=-1, keepdim=True)  # (..., 1)
        xmin = rows.amin(dim=-1, keepdim=True)
        if not self.grid.symmetric:
            # Keep 0 on the grid so that padding/zero activations stay exact.
            xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
        scale, zero_point = self.grid.scale_and_zero(xmin, xmax)
        return fake_quantize(rows, scale, zero_point, self.grid).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, per-token, {'sym' if self.grid.symmetric else 'asym'}"
