"""llama.cpp's K-quant grids as a trainable weight quantizer: LWC on the values llama.cpp stores.

A K-quant row is cut into super-blocks of 256 weights, each cut into sub-blocks of 16 or 32. llama.cpp's
reference quantizer (kquant_search.py and kquant_pack.py reproduce it byte for byte) first searches a
float scale (and, for the types with minima, a float minimum) per sub-block, then quantizes those
to small integers against one fp16 factor per super-block, then rounds every weight against its
quantized sub-block scale:

    asymmetric (Q2_K, Q4_K, Q5_K):  K = 2^(scale bits) - 1 (15 or 63)
        sc_j = min(K, round(s_j · K / max_j s_j)),  d = fp16(max_j s_j / K)    (and mn_j, dmin from the minima)
        q = clamp(round((x + dmin·mn_j) / (d·sc_j)), 0, 2^b - 1),  value = d·sc_j·q - dmin·mn_j
    symmetric (Q3_K, Q6_K):  s* = the sub-block scale of largest magnitude, its sign kept; K = 32 or 128
        sc_j = clamp(round(-K·s_j / s*), -K, K - 1),  d = fp16(-s* / K)
        q = clamp(round(x / (d·sc_j)), -2^(b-1), 2^(b-1) - 1),  value = d·sc_j·q

`KQuantizer` keeps llama.cpp's searched s_j (and minima) of the block's starting weights and learns a
factor 2σ(γ) per sub-block scale (and 2σ(β) per minimum), 1 at γ = β = 0: untrained it is llama.cpp's
quantizer, and training moves exactly the integers and fp16 factors the GGUF file will hold, the
rounding of sc_j, mn_j, d, dmin and q straight-through. Learned rounding offsets and weight deltas
(freedoms.py) apply as on the other grids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.freedoms import FREEDOMS, ROUNDING_LIMIT
from omniquant_pl.quant.primitives import fp16_ste, round_ste

SUPER_BLOCK = 256
GROUP_MAX_EPS = 1e-15  # llama.cpp: a Q6_K super-block whose sub-block scales are all below this is zero


@dataclass(frozen=True)
class KGrid:
    """One K-quant type's structure: sub-block size, code range, sub-scale integer range and factor K."""

    name: str
    bits: int
    sub_block: int
    symmetric: bool
    scale_levels: int  # K: asymmetric sub-scales and mins on 0..K; symmetric ones on -K..K-1

    @property
    def code_range(self) -> tuple[int, int]:
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.symmetric else (0, (1 << self.bits) - 1)


K_GRIDS = {g.name: g for g in (
    KGrid("Q2_K", 2, 16, False, 15), KGrid("Q3_K", 3, 16, True, 32), KGrid("Q4_K", 4, 32, False, 63),
    KGrid("Q5_K", 5, 32, False, 63), KGrid("Q6_K", 6, 16, True, 128),
)}


def _safe(divisor: torch.Tensor) -> torch.Tensor:
    """A divisor with its zeros replaced by 1 (their quotients are discarded; no NaN reaches a gradient)."""
    return torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _quantize_asymmetric(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers on 0..levels, fp16 factor) of non-negative sub-block values (..., n_sub), per super-block."""
    largest = values.amax(dim=-1, keepdim=True)  # (..., 1)
    largest = torch.where(largest > 0, largest, torch.zeros_like(largest))  # llama.cpp: from +0, a strict >
    inverse = torch.where(largest > 0, levels / _safe(largest), torch.zeros_like(largest))
    integers = torch.clamp(round_ste(inverse * values), max=levels)
    return integers, fp16_ste(largest / levels)


def _quantize_symmetric(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers on -levels..levels-1, fp16 factor) of signed sub-block values, per super-block: the value
    of largest magnitude (the first one) maps to -levels."""
    first_largest = values.abs().argmax(dim=-1, keepdim=True)  # torch: the first maximal index
    extreme = values.gather(-1, first_largest)  # (..., 1), signed
    inverse = -levels / _safe(extreme)
    integers = torch.clamp(round_ste(inverse * values), -levels, levels - 1)
    d = fp16_ste(1.0 / inverse)
    return integers, torch.where(extreme.abs() < GROUP_MAX_EPS, torch.zeros_like(d), d)  # llama.cpp: a zero block


def kquant_values(rows: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, search_codes: torch.Tensor,
                  grid: KGrid, rounding: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The K-quant values of `rows` (super-blocks, 256) given float sub-block `scales` (and `mins`, the
    amounts subtracted, for asymmetric types) of shape (super-blocks, n_sub) and the search's codes
    (kept where a sub-block's step is 0, as llama.cpp does): (values, parts) where parts hold codes,
    effective sub-scales d·sc, minima -dmin·mn and the fp16 factors d (and dmin)."""
    n_sub = SUPER_BLOCK // grid.sub_block
    x = rows.reshape(-1, n_sub, grid.sub_block)  # (super-blocks, n_sub, sub_block)
    low, high = grid.code_range
    if grid.symmetric:
        sub_scales, d = _quantize_symmetric(scales, grid.scale_levels)
        step = (d * sub_scales).unsqueeze(-1)  # (super-blocks, n_sub, 1)
        shifted = x / _safe(step)
        offset = torch.zeros_like(step)
        d_min = None
    else:
        sub_scales, d = _quantize_asymmetric(scales, grid.scale_levels)
        sub_mins, d_min = _quantize_asymmetric(mins, grid.scale_levels)
        step = (d * sub_scales).unsqueeze(-1)
        offset = -(d_min * sub_mins).unsqueeze(-1)  # the minimum added back: value = step·q + offset
        shifted = (x - offset) / _safe(step)
    if rounding is not None:
        shifted = shifted + rounding.reshape(x.shape)
    codes = torch.clamp(round_ste(shifted), low, high)
    # a sub-block whose step is 0 keeps the codes of llama.cpp's search (any codes give the same values there)
    codes = torch.where(step == 0, search_codes.reshape(x.shape), codes)
    values = step * codes + offset
    parts = {"codes": codes.reshape(rows.shape), "scale": step.reshape(rows.shape[0], n_sub),
             "minimum": None if grid.symmetric else offset.reshape(rows.shape[0], n_sub), "super_scale": d,
             "super_min": d_min}
    return values.reshape(rows.shape), parts


class TypeQuantizer(nn.Module):
    """The part every llama.cpp-type quantizer shares (K-quants here, IQ4 in iq4_grid.py): the learned
    freedoms' interface of WeightQuantizer, weights cut into rows of `row_block`, and the forward's
    values; subclasses say how the values and the stored integers follow from llama.cpp's search."""

    row_block = SUPER_BLOCK
    type_name: str

    def _init_freedoms(self, weight_shape: tuple[int, int], logits_shape: tuple[int, ...] | None, minima: bool,
                       learn_rounding: bool, learn_weights: bool) -> None:
        """Learned factors 2σ(γ) (and 2σ(β) on minima) of `logits_shape`, None when LWC is off; per-weight
        rounding offsets and deltas when asked."""
        if logits_shape is not None:
            self.upper_logit = nn.Parameter(torch.zeros(logits_shape))  # scale factors
            self.lower_logit = nn.Parameter(torch.zeros(logits_shape)) if minima else None
        else:
            self.register_parameter("upper_logit", None)
            self.register_parameter("lower_logit", None)
        for name, on in (("rounding", learn_rounding), ("weight_delta", learn_weights)):
            self.register_parameter(name, nn.Parameter(torch.zeros(weight_shape)) if on else None)  # (out, in)
        self._searched: tuple[torch.Tensor, ...] | None = None

    # -- the same interface as WeightQuantizer (freedoms, identity, clipping switch) ---------------
    @property
    def learnable(self) -> bool:
        return any(p is not None for p in self.freedom_parameters())

    def freedom_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        names = [name] if name is not None else list(FREEDOMS)
        return [p for n in names for attr in FREEDOMS[n].attributes if (p := getattr(self, attr, None)) is not None]

    @torch.no_grad()
    def disable_clipping(self) -> None:
        """Every freedom at its identity: factors 2σ(0) = 1, no rounding offsets or deltas (llama.cpp's RTN)."""
        for p in (self.upper_logit, self.lower_logit, self.rounding, self.weight_delta):
            if p is not None:
                p.zero_()

    def _rows(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.weight_delta is not None and self.clipping_enabled:
            weight = weight.float() + self.weight_delta
        rounding = None
        if self.rounding is not None and self.clipping_enabled:
            rounding = self.rounding.clamp(-ROUNDING_LIMIT, ROUNDING_LIMIT)
        return weight.float().reshape(-1, self.row_block), rounding  # (rows of row_block weights, row_block)

    @property
    def search_unit(self) -> int:
        """Weights whose values depend on no others (init_search.py): a block or super-block."""
        return self.row_block

    @staticmethod
    def search_logits() -> torch.Tensor:
        """quant.lwc_search's candidates: factors 2σ(γ) 0.80, 0.82, ..., 1.20 on the searched scales."""
        factors = torch.arange(40, 60 + 1, dtype=torch.float64) / 50  # 0.80 ... 1.20
        return torch.logit(factors / 2).float()

    def _factor(self, logit: torch.Tensor | None) -> torch.Tensor | None:
        """The learned factor 2σ(logit) on a searched scale, None when LWC is off or disabled."""
        return 2 * torch.sigmoid(logit) if logit is not None and self.clipping_enabled else None

    def _values(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        values, _ = self._values(weight)
        return values.reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        learned = "+".join(name for name in FREEDOMS if self.freedom_parameters(name)) or "none"
        return f"{self.type_name} (blocks of {self.group_size}), learns={learned}"


class KQuantizer(TypeQuantizer):
    """Fake-quantizes an (out, in) weight on a K-quant type's grid (in a multiple of 256), with LWC-style
    learned factors on llama.cpp's searched sub-block scales and minima (see the module docstring)."""

    def __init__(self, weight_shape: tuple[int, int], type_name: str, learnable_clipping: bool = True,
                 learn_rounding: bool = False, learn_weights: bool = False) -> None:
        super().__init__()
        out_features, in_features = weight_shape
        if in_features % SUPER_BLOCK:
            raise ValueError(f"{type_name} needs rows that are a multiple of {SUPER_BLOCK}, got {in_features}")
        self.grid = K_GRIDS[type_name]
        self.type_name = type_name
        self.group_size = self.grid.sub_block
        self.clipping_enabled = learnable_clipping
        n_sub = SUPER_BLOCK // self.grid.sub_block
        logits = (out_features * in_features // SUPER_BLOCK, n_sub) if learnable_clipping else None
        self._init_freedoms(weight_shape, logits, not self.grid.symmetric, learn_rounding, learn_weights)

    def searched(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """llama.cpp's float sub-block scales (and minima, and codes) of the block's starting weights,
        searched once."""
        if self._searched is None or self._searched[0].device != rows.device:
            from omniquant_pl.quant.kquant_search import search_sub_blocks

            self._searched = search_sub_blocks(rows.detach(), self.type_name)
        return self._searched

    def _values(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, rounding = self._rows(weight)
        # llama.cpp's search of the starting weights (a replay loads learned deltas before its first forward)
        scales, mins, search_codes = self.searched(weight.detach().float().reshape(rows.shape))
        if (factor := self._factor(self.upper_logit)) is not None:
            scales = scales * factor
            if mins is not None:
                mins = mins * self._factor(self.lower_logit)
        return kquant_values(rows, scales, mins, search_codes, self.grid, rounding)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The integers and fp16 factors of `weight` (out, in): their dequantize() is the forward's value."""
        out_features, in_features = weight.shape
        _, parts = self._values(weight)

        def per_row(value: torch.Tensor | None, columns: int) -> torch.Tensor | None:
            return None if value is None else value.reshape(out_features, columns).float().cpu()

        codes = parts["codes"].reshape(out_features, in_features)
        return QuantizedWeight(
            codes=codes.to(torch.int8 if self.grid.symmetric else torch.uint8).cpu(),
            scale=per_row(parts["scale"], in_features // self.grid.sub_block), zero=None, bits=self.grid.bits,
            minimum=per_row(parts["minimum"], in_features // self.grid.sub_block),
            super_scale=per_row(parts["super_scale"], in_features // SUPER_BLOCK),
            super_min=per_row(parts["super_min"], in_features // SUPER_BLOCK),
        )


def sub_integers(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored integer sub-block scales (and minima) of a K-quant weight: sc = scale / d, mn = -minimum /
    dmin (exact: the products are exact in fp32), (out, in // sub_block) each."""
    per_super = weight.scale.shape[1] // weight.super_scale.shape[1]
    d = weight.super_scale.repeat_interleave(per_super, dim=1)
    scales = torch.where(d == 0, torch.zeros_like(d), weight.scale / _safe(d)).round().to(torch.int16).numpy()
    if weight.minimum is None:
        return scales, None
    d_min = weight.super_min.repeat_interleave(per_super, dim=1)
    mins = torch.where(d_min == 0, torch.zeros_like(d_min), -weight.minimum / _safe(d_min)).round().to(torch.int16)
    return scales, mins.numpy()


def pack_kquant(type_name: str, weight: QuantizedWeight) -> np.ndarray:
    """The GGUF bytes of a K-quant weight: (out, in / 256 · block bytes) uint8."""
    from omniquant_pl.quant.kquant_pack import pack_parts

    scales, mins = sub_integers(weight)
    return pack_parts(type_name, weight.codes.numpy(), scales, mins, weight.super_scale.numpy(),
                      None if weight.super_min is None else weight.super_min.numpy())
