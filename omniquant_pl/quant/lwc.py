"""The weight quantizer: Learnable Weight Clipping (LWC: per output channel / group, clip to
xmax·σ(γ), xmin·σ(β)) and the other learned freedoms of freedoms.py (rounding offsets, weight deltas)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.fake_quant import fake_quantize_rows, row_grid
from omniquant_pl.quant.freedoms import FREEDOMS, ROUNDING_LIMIT
from omniquant_pl.quant.primitives import QuantGrid, quantize_codes


def suggest_group_size(requested: int, in_features: list[int]) -> int:
    """A group size for a `requested` one that does not divide every input dimension: the largest
    power of two of at least 8, and at most `requested`, that divides them all; 0 (per channel)
    where there is none."""
    common = math.gcd(*in_features)
    size = 1 << (common & -common).bit_length() - 1  # the largest power of two dividing all dims
    while size > max(requested, 8):
        size //= 2
    return size if size >= 8 else 0


class WeightQuantizer(nn.Module):
    """Fake-quantizes a (out_features, in_features) weight per output channel or per group.

    With `learnable_clipping`, each row (channel or group) owns two logits γ (`upper_logit`) and
    β (`lower_logit`), initialised to `init` (σ(4.0) ≈ 0.982), that shrink its range before the
    grid is fitted. `learn_rounding` adds a per-weight rounding offset (`rounding`, code units, used
    clamped to ±0.5) and `learn_weights` a per-weight delta (`weight_delta`) added to the weight
    before it is quantized (see freedoms.py); both start at 0, where the quantizer is LWC's. Without
    any freedom the quantizer is round-to-nearest (RTN) min-max. On min-max grids an
    asymmetric row's range always includes 0, so its zero point is an integer on the grid (what
    integer formats store); it differs from the official code only for rows whose weights share one
    sign. `gguf_grid` selects llama.cpp's grids (see QuantGrid). `quantize()` hands out the grid as
    data (codes, scale, zero point or minimum).
    """

    def __init__(
        self,
        weight_shape: tuple[int, int],
        bits: int,
        group_size: int | None = None,
        symmetric: bool = False,
        learnable_clipping: bool = True,
        init: float = 4.0,
        gguf_grid: bool = False,
        learn_rounding: bool = False,
        learn_weights: bool = False,
    ) -> None:
        super().__init__()
        out_features, in_features = weight_shape
        if group_size is not None and group_size > 0:
            if in_features % group_size != 0:
                suggestion = suggest_group_size(group_size, [in_features])
                raise ConfigError(
                    f"group_size {group_size} does not divide in_features {in_features}; "
                    f"use {suggestion} ({'a power of two that divides it' if suggestion else 'per channel'})"
                    + (" or 0 for per-channel" if suggestion else "")
                )
            self.row_size = group_size
        else:
            self.row_size = in_features
        self.grid = QuantGrid(bits, symmetric, gguf_grid)
        self.group_size = group_size or 0
        self.clipping_enabled = learnable_clipping
        n_rows = out_features * in_features // self.row_size
        if learnable_clipping:
            self.upper_logit = nn.Parameter(torch.full((n_rows, 1), float(init)))
            self.lower_logit = nn.Parameter(torch.full((n_rows, 1), float(init)))
        else:
            self.register_parameter("upper_logit", None)
            self.register_parameter("lower_logit", None)
        for name, on in (("rounding", learn_rounding), ("weight_delta", learn_weights)):
            self.register_parameter(name, nn.Parameter(torch.zeros(weight_shape)) if on else None)  # (out, in)

    @property
    def learnable(self) -> bool:
        """Whether it learns anything (any freedom on)."""
        return any(p is not None for p in self.freedom_parameters())

    def freedom_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The parameters of freedom `name` (see freedoms.FREEDOMS), or of all of them."""
        names = [name] if name is not None else list(FREEDOMS)
        return [p for n in names for attr in FREEDOMS[n].attributes if (p := getattr(self, attr)) is not None]

    @torch.no_grad()
    def disable_clipping(self) -> None:
        """Set every freedom to its identity (σ(γ) = σ(β) = 1.0 exactly in fp32, zero rounding offsets
        and weight deltas): the learned quantizer computes RTN."""
        for freedom in FREEDOMS.values():
            for attr in freedom.attributes:
                if getattr(self, attr) is not None:
                    getattr(self, attr).fill_(freedom.identity)

    @property
    def search_unit(self) -> int:
        """Weights whose values depend on no others (init_search.py): one row (channel or group)."""
        return self.row_size

    @staticmethod
    def search_logits() -> torch.Tensor:
        """quant.lwc_search's candidates: clipping factors σ(γ) 0.995, 0.98, 0.96, ..., 0.50 (the largest
        below 1, where σ's gradient, and so training, would stop)."""
        factors = torch.cat([torch.tensor([0.995], dtype=torch.float64),
                             torch.arange(49, 25 - 1, -1, dtype=torch.float64) / 50])  # 0.995, 0.98, ..., 0.50
        return torch.logit(factors).float()

    def _clipping_logits(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.upper_logit is not None and self.clipping_enabled:
            return self.upper_logit, self.lower_logit
        return None, None

    def _rows(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows of the weight to quantize, (out·groups, row_size); their rounding offsets or None)."""
        if self.weight_delta is not None and self.clipping_enabled:
            weight = weight.float() + self.weight_delta  # in fp32: a half weight would drop small deltas
        rounding = None
        if self.rounding is not None and self.clipping_enabled:
            rounding = self.rounding.clamp(-ROUNDING_LIMIT, ROUNDING_LIMIT).reshape(-1, self.row_size)
        return weight.reshape(-1, self.row_size), rounding

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows, rounding = self._rows(weight)  # (out·in/row_size, row_size)
        upper, lower = self._clipping_logits()
        grid = self.grid
        quantized = fake_quantize_rows(rows, upper, lower, grid.qmin, grid.qmax, grid.rule, rounding)
        return quantized.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The integer codes, scales and zero points of `weight` (out, in): their `dequantize()` is
        the forward's value computed eagerly in fp32 (the same ops, bit for bit)."""
        out_features, in_features = weight.shape
        rows, rounding = self._rows(weight)
        rows = rows.float()  # (out·groups, row_size)
        upper, lower = self._clipping_logits()
        grid = self.grid
        row = row_grid(rows, upper, lower, grid.qmin, grid.qmax, grid.rule)
        codes = quantize_codes(rows, row, grid.qmin, grid.qmax, grid.rule, rounding)
        groups = in_features // self.row_size

        def per_group(value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return value.reshape(out_features, groups).to(dtype or value.dtype).cpu()  # (out, groups)

        return QuantizedWeight(
            codes=codes.to(torch.int8 if grid.symmetric else torch.uint8).reshape(out_features, in_features).cpu(),
            scale=per_group(row.scale),
            zero=per_group(row.offset, torch.uint8) if grid.rule == "minmax_asym" else None,
            bits=grid.bits,
            minimum=per_group(row.offset) if grid.rule == "gguf_asym" else None,
        )

    def extra_repr(self) -> str:
        granularity = f"group={self.row_size}" if self.group_size else "per-channel"
        sym = ("sym" if self.grid.symmetric else "asym") + ("-gguf" if self.grid.gguf else "")
        learned = "+".join(name for name in FREEDOMS if self.freedom_parameters(name)) or "none"
        return f"bits={self.grid.bits}, {granularity}, {sym}, learns={learned}"


@contextlib.contextmanager
def clipping_disabled(module: nn.Module) -> Iterator[None]:
    """Temporarily turn every WeightQuantizer in `module` into plain RTN (no freedom applies)."""
    from omniquant_pl.quant.kquant_grid import TypeQuantizer

    quantizers = [m for m in module.modules() if isinstance(m, (WeightQuantizer, TypeQuantizer))]
    previous = [q.clipping_enabled for q in quantizers]
    for q in quantizers:
        q.clipping_enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, previous):
            q.clipping_enabled = state
