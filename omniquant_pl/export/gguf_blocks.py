"""GGUF's 32-weight block types that a run's grid maps onto exactly, and their byte layouts.

Each block holds 32 consecutive weights of a row with an fp16 scale d (and, for the ``_1``
types, an fp16 minimum m); llama.cpp dequantizes

    Q4_0: d·(q - 8)    Q5_0: d·(q - 16)    Q8_0: d·q         (symmetric grid, q unsigned / int8)
    Q4_1: d·q + m      Q5_1: d·q + m                         (asymmetric grid)

so a run calibrated with groups of 32 maps exactly: symmetric codes c in [-(2^(b-1) - 1), 2^(b-1) - 1]
are stored as q = c + 2^(b-1) (Q8_0: c itself) with d = s; asymmetric codes give d = s and m = the
grid's minimum (the GGUF grid) or m = -z·s (an integer zero point z). Only d and m are rounded (to
fp16). Runs on the GGUF grid (`quant.grid: gguf`) use all 2^b levels and real-valued minima, as
llama.cpp's own quantizer does; min-max runs map exactly too, on a subset of the levels. Layouts (bytes per block):
Q4_0 d|qs[16], Q4_1 d|m|qs[16], Q5_0 d|qh[4]|qs[16], Q5_1 d|m|qh[4]|qs[16], Q8_0 d|qs[32], where qs
byte j holds weight j in its low nibble and weight j+16 in its high nibble, and bit j of the
little-endian qh holds the 5th bit of weight j.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from omniquant_pl.quant.codes import QuantizedWeight

BLOCK = 32
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExactType:
    name: str
    bits: int
    symmetric: bool

    def matches(self, weight: QuantizedWeight) -> bool:
        return weight.bits == self.bits and weight.symmetric == self.symmetric and weight.group_size == BLOCK

    def grid(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.bits}-bit {kind} grid with groups of {BLOCK}"


EXACT_TYPES = {t.name: t for t in (
    ExactType("Q4_0", 4, True), ExactType("Q4_1", 4, False), ExactType("Q5_0", 5, True),
    ExactType("Q5_1", 5, False), ExactType("Q8_0", 8, True),
)}


def exact_gguf_type(quant) -> str | None:
    """The GGUF type that stores a run's grid exactly (a QuantConfig), if any."""
    if quant.abits < 16 or quant.group_size != BLOCK:
        return None
    return next((t.name for t in EXACT_TYPES.values() if (t.bits, t.symmetric) == (quant.wbits, quant.symmetric)), None)


def warn_if_no_exact_gguf_type(quant) -> None:
    """quant.grid gguf is llama.cpp's grid: say before calibrating when no GGUF type will store it."""
    if quant.grid == "gguf" and exact_gguf_type(quant) is None:
        log.warning("quant.grid gguf with %s (%s): no GGUF type stores this grid exactly; exact GGUF exports need "
                    "groups of 32, weight-only, and 4/5-bit (or symmetric 8-bit) weights", quant.tag,
                    "symmetric" if quant.symmetric else "asymmetric")


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)  # (blocks, 2)


def _nibbles(low4: np.ndarray) -> np.ndarray:
    """(blocks, 32) values < 16 -> (blocks, 16) bytes: weight j low, weight j+16 high."""
    return low4[:, :16] | (low4[:, 16:] << np.uint8(4))


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) 5-bit values -> (blocks, 4) bytes: bit j = 5th bit of weight j (little endian)."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")


def minimum_of(weight: QuantizedWeight) -> torch.Tensor:
    """m of x = q·d + m per group (out, groups), fp32: the GGUF grid's minimum or -z·s."""
    return weight.minimum if weight.minimum is not None else -weight.zero.float() * weight.scale


def pack_blocks(type_name: str, weight: QuantizedWeight) -> np.ndarray:
    """The GGUF bytes of a weight on an exact type's grid: (out, in/32 · block bytes) uint8."""
    exact = EXACT_TYPES[type_name]
    if not exact.matches(weight):
        raise ValueError(f"{type_name} needs a {exact.grid()}; got {weight.bits}-bit groups of {weight.group_size}")
    out_features = weight.shape[0]
    codes = weight.codes.numpy().astype(np.int16).reshape(-1, BLOCK)  # (blocks, 32)
    scale = weight.scale.numpy().reshape(-1)  # (blocks,) fp32
    d = _fp16_bytes(scale)
    if type_name == "Q8_0":
        parts = [d, codes.astype(np.int8).view(np.uint8)]
    elif exact.symmetric:  # Q4_0 / Q5_0: unsigned q = c + 2^(b-1)
        q = (codes + (1 << (exact.bits - 1))).astype(np.uint8)
        parts = [d, _nibbles(q & np.uint8(0x0F))] if exact.bits == 4 else [d, _high_bits(q), _nibbles(q & np.uint8(0x0F))]
    else:  # Q4_1 / Q5_1: q = c, m = -z·s (in fp32, then fp16)
        q = codes.astype(np.uint8)
        m = _fp16_bytes(minimum_of(weight).numpy().reshape(-1))
        parts = [d, m, _nibbles(q & np.uint8(0x0F))] if exact.bits == 4 else [d, m, _high_bits(q), _nibbles(q & np.uint8(0x0F))]
    blocks = np.concatenate(parts, axis=-1)  # (out·in/32, block bytes)
    return blocks.reshape(out_features, -1)


def expected_dequantized(weight: QuantizedWeight) -> torch.Tensor:
    """What llama.cpp computes from `pack_blocks` of any exact type: q·d + m with d and m rounded to
    fp16 (for a run on llama.cpp's own grid, `quant.grid: gguf`, exactly the run's values)."""
    minimum = None if weight.symmetric else minimum_of(weight).half().float()
    return QuantizedWeight(weight.codes, weight.scale.half().float(), None, weight.bits, minimum).dequantize()


def pack_linear(type_name: str, weight: QuantizedWeight) -> np.ndarray:
    """The GGUF bytes of one linear on `type_name`'s grid: a legacy 32-weight type, a K-quant or an IQ4."""
    if type_name in EXACT_TYPES:
        return pack_blocks(type_name, weight)
    if type_name.startswith("IQ4"):
        from omniquant_pl.quant.iq4_grid import pack_iq4

        return pack_iq4(type_name, weight)
    from omniquant_pl.quant.kquant_grid import pack_kquant

    return pack_kquant(type_name, weight)
