"""Uniform affine fake quantization with straight-through estimators (STE) for rounding.

Every quantizer in the project reduces to: clip each row's range (`xmin`, `xmax`; LWC learns the
clipping), fit a grid to it (`fit_row_grid`), compute integer codes (`quantize_codes`) and their
values (`dequantize_codes`). Rows are the last dimension of the input. A grid follows one of these
rules (`QuantGrid.rule`):

  minmax_asym  codes [0, 2^b - 1], integer zero point z: (q - z)·s; the range always holds 0
  minmax_sym   codes ±(2^(b-1) - 1): q·s                                (the official code's grids)
  gguf_asym    codes [0, 2^b - 1], real-valued minimum: q·d + m          (llama.cpp Q4_1, Q5_1)
  gguf_sym     codes [-2^(b-1), 2^(b-1) - 1], d = e / -2^(b-1) for the row's first largest-magnitude
               value e (a negative d when e > 0): q·d                     (llama.cpp Q4_0, Q5_0)
  gguf_q8      codes ±127, d = max|x| / 127: q·d                          (llama.cpp Q8_0)

The gguf rules compute codes with llama.cpp's own arithmetic (reciprocal scale, truncation after
+0.5, round-half-away for Q8_0) and values with d and m rounded to fp16 as the file stores them, so
unclipped they reproduce llama.cpp's quantizer byte for byte, and the values are what it computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from omniquant_pl.errors import ConfigError

# The paper clamps min-max scales away from zero (and infinity) so that x / scale stays finite.
SCALE_MIN = 1e-5
SCALE_MAX = 1e4
ZERO_POINT_LIMIT = 1e4
RULES = ("minmax_asym", "minmax_sym", "gguf_asym", "gguf_sym", "gguf_q8")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass; identity gradient in the backward pass. (The forward
    value is exactly round(x): x + (round(x) - x) adds an exactly computed difference.)"""
    return x + (x.round() - x).detach()


def trunc_ste(x: torch.Tensor) -> torch.Tensor:
    """Truncate toward zero (C's float-to-int conversion) with an identity gradient."""
    return x + (x.trunc() - x).detach()


def round_half_away_ste(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero) with an identity gradient."""
    whole = x.trunc()
    rounded = torch.where((x - whole).abs() == 0.5, whole + x.sign(), x.round())
    return x + (rounded - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest fp16 value (kept in x's dtype), with an identity gradient (values
    already in fp16 pass unchanged, -0.0 included)."""
    rounded = x.half().to(x.dtype)
    return torch.where(rounded == x, x, x + (rounded - x).detach())


@dataclass(frozen=True)
class QuantGrid:
    """The integer grid of a `bits`-bit quantizer: min-max (the official code's) or llama.cpp's."""

    bits: int
    symmetric: bool = False
    gguf: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(
                f"quantizer bits must be an integer in 2..8, got {self.bits!r} "
                "(quant.abits 16 leaves activations unquantized; weights are always quantized)"
            )

    @property
    def rule(self) -> str:
        if not self.gguf:
            return "minmax_sym" if self.symmetric else "minmax_asym"
        if not self.symmetric:
            return "gguf_asym"
        return "gguf_q8" if self.bits == 8 else "gguf_sym"

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.rule == "gguf_sym" else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


class RowGrid(NamedTuple):
    """Per-row (rows, 1) grid: values are q·scale + offset (gguf) or (q - offset)·scale (min-max);
    codes are computed from `code_scale` (s, or llama.cpp's reciprocal 1/d) and `code_offset`."""

    scale: torch.Tensor
    offset: torch.Tensor
    code_scale: torch.Tensor
    code_offset: torch.Tensor


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def fit_row_grid(xmin: torch.Tensor, xmax: torch.Tensor, extreme: torch.Tensor | None, qmin: int, qmax: int,
                 rule: str) -> RowGrid:
    """The grid of each row from its (clipped) range; `extreme` (gguf_sym only) is the row's first
    largest-magnitude value, clipped. The min-max zero point is rounded without STE (as the paper
    does): LWC gradients reach γ/β through the scale."""
    zeros = torch.zeros_like(xmax)
    if rule == "minmax_asym":
        scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero_point = (-xmin / scale).clamp(-ZERO_POINT_LIMIT, ZERO_POINT_LIMIT).round()
        return RowGrid(scale, zero_point, scale, zero_point)
    if rule == "minmax_sym":
        scale = (torch.maximum(xmin.abs(), xmax.abs()) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return RowGrid(scale, zeros, scale, zeros)
    if rule == "gguf_asym":
        d = (xmax - xmin) / qmax
        return RowGrid(fp16_ste(d), fp16_ste(xmin), _reciprocal(d), xmin)
    if rule == "gguf_sym":
        d = extreme / qmin
        return RowGrid(fp16_ste(d), zeros, _reciprocal(d), zeros)
    if rule == "gguf_q8":
        d = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        return RowGrid(fp16_ste(d), zeros, _reciprocal(d), zeros)
    raise ValueError(f"unknown quantization rule {rule!r}; one of {RULES}")


def quantize_codes(x: torch.Tensor, grid: RowGrid, qmin: int, qmax: int, rule: str,
                   rounding: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes of `x` (fp32 values, STE rounding) on `grid`. `rounding`: a learned offset in code
    units added right before the rounding (None: round to nearest, as llama.cpp and the paper)."""
    def shifted(t: torch.Tensor) -> torch.Tensor:
        return t if rounding is None else t + rounding

    if rule.startswith("minmax"):
        return torch.clamp(round_ste(shifted(x / grid.code_scale)) + grid.code_offset, qmin, qmax)
    if rule == "gguf_asym":  # llama.cpp: (int)((x - min)·id + 0.5), at most 2^b - 1
        return torch.clamp(trunc_ste(shifted((x - grid.code_offset) * grid.code_scale + 0.5)), qmin, qmax)
    if rule == "gguf_sym":  # llama.cpp: (int)(x·id + 2^(b-1) + 0.5) - 2^(b-1), on [0, 2^b - 1]
        return torch.clamp(trunc_ste(shifted(x * grid.code_scale + (0.5 - qmin))), 0, qmax - qmin) + qmin
    return torch.clamp(round_half_away_ste(shifted(x * grid.code_scale)), qmin, qmax)  # gguf_q8: roundf(x·id)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float, rule: str) -> torch.Tensor:
    """The values of codes: (q - z)·s (min-max) or q·d + m (gguf; m = 0 when symmetric)."""
    if rule.startswith("minmax"):
        return (q - offset) * scale
    return q * scale + offset


def fake_quantize(x: torch.Tensor, grid: RowGrid, qmin: int, qmax: int, rule: str,
                  rounding: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize to the integer grid and de-quantize back; the grid broadcasts against `x`."""
    return dequantize_codes(quantize_codes(x, grid, qmin, qmax, rule, rounding), grid.scale, grid.offset, rule)


def check_bits(name: str, bits: int, unquantized: bool = True) -> None:
    """Bits of a config field: 2..8 quantizes; 16 means "leave in floating point" where
    `unquantized` allows it (activations; weights are always quantized)."""
    if isinstance(bits, int) and (2 <= bits <= 8 or (bits == 16 and unquantized)):
        return
    if unquantized:
        raise ConfigError(f"{name} must be an integer in 2..8, or 16 for no quantization; got {bits!r}")
    raise ConfigError(
        f"{name} must be an integer in 2..8 (weights are always quantized; 16 = floating point is for "
        f"quant.abits only); got {bits!r}. For the unquantized model's numbers run: omniquant evaluate "
        "--model.name_or_path MODEL --baselines [fp]"
    )
