"""llama.cpp's IQ4_NL and IQ4_XS grids as a trainable weight quantizer: LWC on the values llama.cpp stores.

Both store, per 32 weights, 4-bit indices q into 16 non-uniform levels (``kvalues_iq4nl``, -127..113):

    IQ4_NL  blocks of 32, an fp16 scale d:                    value = d·level[q]          (18 bytes per 32)
    IQ4_XS  super-blocks of 256, one fp16 d and a 6-bit signed
            integer l in -32..31 per 32:                       value = d·l·level[q]        (136 bytes per 256)

llama.cpp's quantizer (``quantize_iq4_nl`` / ``quantize_iq4_xs``, what llama-quantize calls; no
importance matrix: weights x²) searches each block's scale: it starts from e/127 (e the block's first
weight of largest magnitude), then tries the 15 inverse scales (t - 127)/e, t = -7..7, each time
taking the nearest level per weight and the least-squares scale Σwqx/Σwq², and keeps the candidate of
largest (Σwqx)²/Σwq². IQ4_NL rounds each weight against that fp32 scale s; IQ4_XS quantizes the 8
scales of a super-block, l = clamp(round(s/d), -32, 31) with d = -s*/32 (s* the first scale of
largest magnitude), and rounds each weight against d·l. `search_scales` reproduces the search bit for
bit (sums run element by element in llama.cpp's order; tests compare bytes with libggml's own).

`IQ4Quantizer` keeps the searched scales of the block's starting weights and learns a factor 2σ(γ)
per 32-weight scale, 1 at γ = 0 (llama.cpp's quantizer). The scale's gradient holds the chosen levels
(value = d·level: the exact derivative wherever the choice does not change; a straight-through level
choice adds -x/d, which on levels 10 to 24 apart pushed every scale toward zero and made the output
error 5x worse in tests/test_iq4_grid.py's training test); the level choice is straight-through for
the weight, and the fp16 and 6-bit roundings are straight-through. A
learned rounding offset V moves a weight by V times the gap between the two levels around it
before the nearest level is taken. Codes are kept as the level values themselves (int8), so that a
`QuantizedWeight`'s codes·scale is the value llama.cpp computes.
"""
from __future__ import annotations

import numpy as np
import torch

from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.kquant_grid import SUPER_BLOCK, TypeQuantizer, _safe, sub_integers
from omniquant_pl.quant.primitives import fp16_ste, round_ste

BLOCK = 32
GROUP_MAX_EPS = 1e-15
LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
IQ4_TYPES = ("IQ4_NL", "IQ4_XS")
BLOCK_BYTES = {"IQ4_NL": 18, "IQ4_XS": 136}
SEARCH_STEPS = 7  # llama.cpp's ntry


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=torch.float32, device=device)


def best_index(a: torch.Tensor) -> torch.Tensor:
    """llama.cpp's best_index_int8: the index of the level nearest to each value of `a` (ties go up)."""
    levels = _levels(a.device)
    upper = torch.searchsorted(levels, a.contiguous(), right=True).clamp(1, len(LEVELS) - 1)  # first level > a
    return torch.where(a - levels[upper - 1] < levels[upper] - a, upper - 1, upper)


class _NearestLevel(torch.autograd.Function):
    """The nearest level's value in the forward (exactly), an identity gradient in the backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        return _levels(a.device)[best_index(a)]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def search_scales(blocks: torch.Tensor) -> torch.Tensor:
    """(B,) llama.cpp's float scale of each block of 32 weights (B, 32): 0 for a block below 1e-15."""
    x = blocks.float()
    levels = _levels(x.device)
    weights = x * x
    magnitude = x.abs()
    peak = x.gather(1, magnitude.argmax(dim=1, keepdim=True)).squeeze(1)  # the first of largest magnitude, signed
    zero = magnitude.amax(dim=1) < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def sums(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = levels[best_index(inverse.unsqueeze(1) * x)]  # (B, 32)
        sum_qx, sum_q2 = torch.zeros_like(inverse), torch.zeros_like(inverse)
        for j in range(x.shape[1]):  # llama.cpp's order: sum += w*q*x, w*q*q
            wq = weights[:, j] * q[:, j]
            sum_qx = sum_qx + wq * x[:, j]
            sum_q2 = sum_q2 + wq * q[:, j]
        return sum_qx, sum_q2

    start = -peak / torch.tensor(float(LEVELS[0]))
    sum_qx, sum_q2 = sums(1 / start)
    scale = torch.where(sum_q2 > 0, sum_qx / _safe(sum_q2), torch.zeros_like(sum_qx))
    best = scale * sum_qx
    for step in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        sum_qx, sum_q2 = sums(torch.tensor(float(step + LEVELS[0])) / peak)
        better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
        scale = torch.where(better, sum_qx / _safe(sum_q2), scale)
        best = torch.where(better, scale * sum_qx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _super_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_XS: (6-bit integers l (S, 8), fp32 factor d (S, 1)) of the block scales (S, 8) of each
    super-block, rounding straight-through."""
    first_largest = scales.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.where(scales.abs().amax(dim=-1, keepdim=True) > 0, scales.gather(-1, first_largest),
                          torch.zeros_like(first_largest, dtype=scales.dtype))  # (S, 1), signed
    d = -extreme / 32
    inverse = torch.where(d != 0, 1 / _safe(d), torch.zeros_like(d))
    return torch.clamp(round_ste(inverse * scales), -32, 31), d


class IQ4Quantizer(TypeQuantizer):
    """Fake-quantizes an (out, in) weight on llama.cpp's IQ4_NL grid (in a multiple of 32) or IQ4_XS grid
    (a multiple of 256), with learned factors on llama.cpp's searched scales (module docstring)."""

    def __init__(self, weight_shape: tuple[int, int], type_name: str = "IQ4_NL", learnable_clipping: bool = True,
                 learn_rounding: bool = False, learn_weights: bool = False) -> None:
        super().__init__()
        out_features, in_features = weight_shape
        if type_name not in IQ4_TYPES:
            raise ValueError(f"no IQ4 grid for {type_name}")
        self.type_name = type_name
        self.row_block = BLOCK if type_name == "IQ4_NL" else SUPER_BLOCK
        if in_features % self.row_block:
            raise ValueError(f"{type_name} needs rows that are a multiple of {self.row_block}, got {in_features}")
        self.group_size = BLOCK
        self.clipping_enabled = learnable_clipping
        logits = (out_features * in_features // BLOCK,) if learnable_clipping else None
        self._init_freedoms(weight_shape, logits, False, learn_rounding, learn_weights)

    def searched(self, blocks: torch.Tensor) -> tuple[torch.Tensor]:
        """llama.cpp's float scales (blocks,) of the block's starting weights, searched once."""
        if self._searched is None or self._searched[0].device != blocks.device:
            self._searched = (search_scales(blocks.detach()),)
        return self._searched

    def _values(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, rounding = self._rows(weight)
        x = rows.reshape(-1, BLOCK)  # (blocks, 32)
        # llama.cpp's search of the starting weights (a replay loads learned deltas before its first forward)
        (scales,) = self.searched(weight.detach().float().reshape(x.shape))
        if (factor := self._factor(self.upper_logit)) is not None:
            scales = scales * factor
        if self.type_name == "IQ4_NL":
            d = fp16_ste(scales).unsqueeze(1)  # (blocks, 1): what the file stores
            step, super_scale = d, None
            rounding_scale = scales.unsqueeze(1)  # llama.cpp rounds against the fp32 scale
        else:
            integers, d32 = _super_scales(scales.reshape(-1, SUPER_BLOCK // BLOCK))  # (S, 8), (S, 1)
            super_scale = fp16_ste(d32)
            step = (super_scale * integers).reshape(-1, 1)  # (blocks, 1)
            rounding_scale = (d32 * integers).reshape(-1, 1)  # llama.cpp rounds against the fp32 d·l
        inverse = torch.where(rounding_scale != 0, 1 / _safe(rounding_scale), torch.zeros_like(rounding_scale))
        shifted = inverse.detach() * x  # (blocks, 32), in level units; the scale's gradient: codes held
        if rounding is not None:
            levels = _levels(x.device)
            below = torch.searchsorted(levels, shifted.detach().contiguous(), right=True).clamp(1, len(LEVELS) - 1)
            gap = (levels[below] - levels[below - 1])  # the gap between the levels around each weight
            shifted = shifted + rounding.reshape(x.shape) * gap
        codes = _NearestLevel.apply(shifted)  # level values
        values = step * codes
        parts = {"codes": codes, "scale": step, "super_scale": super_scale}
        return values.reshape(rows.shape), parts

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The level values and fp16 factors of `weight` (out, in): their dequantize() is the forward's value."""
        out_features, in_features = weight.shape
        _, parts = self._values(weight)
        super_scale = parts["super_scale"]
        return QuantizedWeight(
            codes=parts["codes"].reshape(out_features, in_features).to(torch.int8).cpu(),
            scale=parts["scale"].reshape(out_features, in_features // BLOCK).float().cpu(), zero=None, bits=8,
            super_scale=None if super_scale is None else super_scale.reshape(out_features, -1).float().cpu(),
        )


def pack_iq4(type_name: str, weight: QuantizedWeight) -> np.ndarray:
    """The GGUF bytes of an IQ4 weight: (out, in / block · block bytes) uint8."""
    out_features = weight.shape[0]
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[np.array(LEVELS, dtype=np.int16) + 128] = np.arange(len(LEVELS), dtype=np.uint8)
    indices = lookup[weight.codes.numpy().astype(np.int16).reshape(-1, BLOCK) + 128]  # (blocks, 32)
    if (indices == 255).any():
        raise ValueError(f"{type_name} codes must be IQ4 level values")
    nibbles = indices[:, :16] | (indices[:, 16:] << np.uint8(4))  # (blocks, 16): weight j low, j + 16 high
    if type_name == "IQ4_NL":
        d = weight.scale.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
        return np.concatenate([d, nibbles], axis=-1).reshape(out_features, -1)
    d = weight.super_scale.numpy().reshape(-1)  # (S,)
    per_super = SUPER_BLOCK // BLOCK
    integers, _ = sub_integers(weight)  # l = scale / d, (out, in / 32)
    stored = (integers.reshape(-1, per_super) + 32).astype(np.uint16)  # (S, 8) in 0..63
    high = ((stored >> 4) << (2 * np.arange(per_super, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    low = (stored & 0xF).astype(np.uint8)
    parts = [d.astype(np.float16).reshape(-1, 1).view(np.uint8), high.reshape(-1, 1).view(np.uint8),
             low[:, 0::2] | (low[:, 1::2] << np.uint8(4)), nibbles.reshape(-1, per_super * 16)]
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)
