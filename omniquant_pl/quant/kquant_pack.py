"""The GGUF block bytes of llama.cpp's K-quants, from a weight's integers (ggml-common.h's block layouts).

Per super-block of 256 weights (codes L as stored: unsigned, Q3_K's and Q6_K's shifted by 4 and 32):

    Q2_K  84 bytes   scales[16] (sc | mn << 4), qs[64], d, dmin
    Q3_K 110 bytes   hmask[32], qs[64], scales[12] (6-bit sc + 32, split 4 + 2 bits), d
    Q4_K 144 bytes   d, dmin, scales[12] (6-bit sc and mn, packed by get_scale_min_k4's rule), qs[128]
    Q5_K 176 bytes   d, dmin, scales[12], qh[32], qs[128]
    Q6_K 210 bytes   ql[128], qh[64], scales[16] (int8), d

2-bit fields (Q2_K, Q3_K's low bits) interleave four 32-weight rows of each 128 (byte l of a 128-chunk
holds weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6); 4-bit fields two rows of each 64 (weight l low
nibble, l+32 high); Q3_K's third bit of weight j sits at bit j // 32 of hmask[j % 32]; Q5_K's fifth bit
of weights l and l+32 of the i-th 64-chunk at bits 2i and 2i+1 of qh[l]; Q6_K's top two bits of
weights l, l+32, l+64, l+96 of a 128-chunk at bits 0, 2, 4, 6 of qh[l]. d and dmin are fp16.
"""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
CODE_OFFSET = {"Q2_K": 0, "Q3_K": 4, "Q4_K": 0, "Q5_K": 0, "Q6_K": 32}


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)  # (blocks, 2)


def _crumbs(low2: np.ndarray) -> np.ndarray:
    """(blocks, 256) 2-bit values -> (blocks, 64) bytes: per 128 weights, byte l = l | l+32 | l+64 | l+96."""
    chunks = low2.reshape(-1, 2, 4, 32)  # (blocks, 128-chunk, row of 32, l)
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]
    return (chunks << shifts).sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def _nibbles(low4: np.ndarray) -> np.ndarray:
    """(blocks, 256) 4-bit values -> (blocks, 128) bytes: per 64 weights, byte l = l | (l+32) << 4."""
    chunks = low4.reshape(-1, 4, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << np.uint8(4))).reshape(-1, 128)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(blocks, 8) 6-bit scales and mins -> (blocks, 12) bytes (Q4_K / Q5_K)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4]
    out[:, 4:8] = mn[:, 0:4]
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (sc[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (mn[:, 4:8] >> 4) << 6
    return out


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """(blocks, 16) 6-bit unsigned scales (sc + 32) -> (blocks, 12) bytes (Q3_K)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (sc[:, 0:8] & 0xF) | ((sc[:, 8:16] & 0xF) << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= (sc[:, j] >> 4) << (2 * (j // 4))
    return out


def pack_parts(type_name: str, codes: np.ndarray, sub_scales: np.ndarray, sub_mins: np.ndarray | None,
               d: np.ndarray, d_min: np.ndarray | None) -> np.ndarray:
    """(out, in) codes (signed for Q3_K/Q6_K), (out, in // sub) integer sub-scales and mins, (out, in // 256)
    d and dmin -> (out, in // 256 · block bytes) uint8."""
    out_features = codes.shape[0]
    stored = (codes.astype(np.int16) + CODE_OFFSET[type_name]).astype(np.uint8).reshape(-1, 256)  # (blocks, 256)
    n_sub = sub_scales.shape[1] * 256 // codes.shape[1]
    sc = sub_scales.reshape(-1, n_sub)
    mn = None if sub_mins is None else sub_mins.reshape(-1, n_sub).astype(np.uint8)
    d16 = _fp16(d.reshape(-1))
    if type_name == "Q2_K":
        parts = [(sc.astype(np.uint8) & 0xF) | (mn << 4), _crumbs(stored), d16, _fp16(d_min.reshape(-1))]
    elif type_name == "Q3_K":
        high = (stored >> 2) & 1  # (blocks, 256): the third bit
        hmask = (high.reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
        zero_block = (d.reshape(-1, 1) == 0)  # llama.cpp leaves a zero super-block's scales at 0 (sc = -32)
        parts = [hmask, _crumbs(stored & 3), _q3_scales(np.where(zero_block, 0, sc + 32).astype(np.uint8)), d16]
    elif type_name in ("Q4_K", "Q5_K"):
        parts = [d16, _fp16(d_min.reshape(-1)), _k4_scales(sc.astype(np.uint8), mn)]
        if type_name == "Q5_K":
            fifth = ((stored >> 4) & 1).reshape(-1, 4, 2, 32)  # (blocks, 64-chunk i, row, l): bit 2i + row
            shifts = (2 * np.arange(4, dtype=np.uint8)[:, None] + np.arange(2, dtype=np.uint8)[None, :])[None, :, :, None]
            parts.append((fifth << shifts).sum(axis=(1, 2), dtype=np.uint8))
        parts.append(_nibbles(stored & 0xF))
    elif type_name == "Q6_K":
        low = (stored & 0xF).reshape(-1, 2, 2, 2, 32)  # (blocks, 128-chunk, high nibble?, row pair, l)
        ql = (low[:, :, 0] | (low[:, :, 1] << np.uint8(4))).reshape(-1, 128)
        top = (stored >> 4).reshape(-1, 2, 4, 32)
        qh = (top << (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]).sum(axis=2, dtype=np.uint8).reshape(-1, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d16]
    else:
        raise ValueError(f"no K-quant layout for {type_name}")
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)
