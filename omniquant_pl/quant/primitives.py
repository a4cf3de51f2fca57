"""Uniform affine fake quantization with a straight-through estimator (STE) for rounding.

Every quantizer in the project reduces to: pick `xmin`/`xmax` per row, turn them into a scale and
zero point (or, on GGUF's asymmetric grid, a real-valued minimum) on a `QuantGrid`, then
`fake_quantize`. Rows are the last dimension of the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniquant_pl.errors import ConfigError

# The paper clamps scales away from zero (and infinity) so that x / scale stays finite.
SCALE_MIN = 1e-5
SCALE_MAX = 1e4
ZERO_POINT_LIMIT = 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass; identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


@dataclass(frozen=True)
class QuantGrid:
    """The integer grid of a `bits`-bit quantizer.

    Min-max grids (the official code's): asymmetric [0, 2^b - 1] with an integer zero point,
    symmetric [-(2^(b-1) - 1), 2^(b-1) - 1] with the zero point at 0 (the restricted range keeps
    +max and -max exactly representable).

    GGUF grids (`gguf`, llama.cpp's 4/5-bit block types): asymmetric [0, 2^b - 1] with a real-valued
    minimum, x = q·s + m (Q4_1/Q5_1); symmetric on all 2^b levels [-2^(b-1), 2^(b-1) - 1] with the
    row's larger-magnitude extreme on -2^(b-1), a negative scale when that extreme is positive
    (Q4_0/Q5_0). Unclipped, they round exactly as llama.cpp's reference quantizer does.
    """

    bits: int
    symmetric: bool = False
    gguf: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(
                f"quantizer bits must be an integer in 2..8, got {self.bits!r} "
                "(use 16 in the config to leave a tensor unquantized)"
            )

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.gguf else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def float_minimum(self) -> bool:
        """Asymmetric with a real-valued minimum instead of an integer zero point."""
        return self.gguf and not self.symmetric

    def scale_and_zero(
        self, xmin: torch.Tensor, xmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (or minimum) that map [xmin, xmax] onto the grid."""
        return scale_and_zero(xmin, xmax, self.qmin, self.qmax, self.symmetric, self.float_minimum)


def scale_and_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool, float_minimum: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset that map [xmin, xmax] onto the grid [qmin, qmax]: the offset is an integer
    zero point, or with `float_minimum` the minimum xmin itself.

    The zero point is rounded without STE (as the paper does): LWC gradients reach γ/β through
    the scale, and measured on heavy-tailed and Gaussian weights this converges more stably
    than an STE zero point.
    """
    if symmetric and qmin == -qmax - 1:  # all 2^b levels: the larger-magnitude extreme lands on qmin
        extreme = torch.where(xmax.abs() >= xmin.abs(), xmax, xmin)
        magnitude = (extreme.abs() / -qmin).clamp(SCALE_MIN, SCALE_MAX)
        scale = torch.where(extreme > 0, -magnitude, magnitude)
        return scale, torch.zeros_like(scale)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = (absmax / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    if float_minimum:
        return scale, xmin
    zero_point = (-xmin / scale).clamp(-ZERO_POINT_LIMIT, ZERO_POINT_LIMIT).round()
    return scale, zero_point


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                   float_minimum: bool = False) -> torch.Tensor:
    """The integer codes of `x` (rounded with the STE): round(x/s) + z, or round((x - m)/s)."""
    if float_minimum:
        return torch.clamp(round_ste((x - offset) / scale), qmin, qmax)
    return torch.clamp(round_ste(x / scale) + offset, qmin, qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, float_minimum: bool = False
                     ) -> torch.Tensor:
    """(q - z)·s, or q·s + m."""
    return q * scale + offset if float_minimum else (q - offset) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int, float_minimum: bool = False
) -> torch.Tensor:
    """Quantize to the integer grid [qmin, qmax] and de-quantize back; `scale`/`offset` (zero point
    or minimum) broadcast against `x`."""
    return dequantize_codes(quantize_codes(x, scale, offset, qmin, qmax, float_minimum), scale, offset, float_minimum)


def check_bits(name: str, bits: int) -> None:
    """Bits of a config field: 2..8 quantizes, 16 means "leave in floating point"."""
    if not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 16):
        raise ConfigError(
            f"{name} must be an integer in 2..8, or 16 for no quantization; got {bits!r}"
        )
