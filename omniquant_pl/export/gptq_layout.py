"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel; vLLM's ``gptq`` method takes 2, 3, 4 and 8 bits).

One linear of weight (out, in), quantized in groups of g input columns (g = in per channel):

    qweight  (in·b/32, out) int32   the unsigned b-bit codes q[j, o] of each output channel o, input
                                    column j = 0, 1, ... packed into a little-endian bit stream (code j
                                    at bits b·j .. b·j + b - 1 of the column's words): 32/b codes per
                                    word for b = 2, 4, 8; for b = 3, 32 codes per 3 words, so codes 10
                                    and 21 straddle two words
    qzeros   (groups, out·b/32) int32   zero points z[group, o] on the same bit stream along the outputs;
                                    checkpoint_format ``gptq`` stores z - 1 (engines add the 1 back),
                                    ``gptq_v2`` stores z
    scales   (groups, out) fp16
    g_idx    (in,) int32            input column j belongs to group j // g

and the weight is  W[o, j] = scales[g_idx[j], o] · (q[j, o] - z[g_idx[j], o]).

A run's codes map without change: asymmetric min-max codes and integer zero points are stored as they
are; symmetric codes c (on ±(2^(b-1) - 1), or from -2^(b-1) on llama.cpp's grid) become q = c + 2^(b-1)
with z = 2^(b-1). Only the scales are rounded (to fp16, the dtype the format and vLLM's kernels use).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omniquant_pl.quant.codes import QuantizedWeight

GPTQ_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def _pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """(n, m) unsigned b-bit values -> (n·b/32, m) int32: along axis 0, value i at bits b·i.. of the stream."""
    n, m = values.shape
    chunks = n * bits // WORD_BITS
    stream = (values.astype(np.uint32)[:, None, :] >> np.arange(bits, dtype=np.uint32)[None, :, None]) & 1  # (n, b, m)
    stream = stream.reshape(chunks, WORD_BITS, m)  # (words, 32 bits, m): stream bit 32·w + s
    words = (stream << np.arange(WORD_BITS, dtype=np.uint32)[None, :, None]).sum(axis=1, dtype=np.uint64)
    return words.astype(np.uint32).view(np.int32)  # (words, m)


def _unpack_stream(words: np.ndarray, bits: int) -> np.ndarray:
    """(n·b/32, m) int32 -> (n, m) unsigned values: the inverse of _pack_stream."""
    chunks, m = words.shape
    stream = (words.view(np.uint32)[:, None, :] >> np.arange(WORD_BITS, dtype=np.uint32)[None, :, None]) & 1
    stream = stream.reshape(chunks * WORD_BITS // bits, bits, m)  # (n, b, m)
    return (stream << np.arange(bits, dtype=np.uint32)[None, :, None]).sum(axis=1).astype(np.uint8)  # (n, m)


@dataclass(frozen=True)
class GPTQTensors:
    """One linear in the GPTQ layout (see the module docstring)."""

    qweight: torch.Tensor  # (in·b/32, out) int32
    qzeros: torch.Tensor  # (groups, out·b/32) int32
    scales: torch.Tensor  # (groups, out) fp16
    g_idx: torch.Tensor  # (in,) int32

    def state(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.{name}": getattr(self, name) for name in ("qweight", "qzeros", "scales", "g_idx")}


def unsigned_codes(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in), zero points (out, groups)) as GPTQ's unsigned integers."""
    if weight.minimum is not None:
        raise ValueError("a real-valued minimum (llama.cpp's asymmetric grid) has no integer zero point")
    if weight.symmetric:
        middle = 1 << (weight.bits - 1)
        return (weight.codes.to(torch.int16) + middle).to(torch.uint8), torch.full_like(weight.scale, middle,
                                                                                         dtype=torch.uint8)
    return weight.codes.to(torch.uint8), weight.zero.to(torch.uint8)


def layout_problems(out_features: int, in_features: int, bits: int) -> list[str]:
    """What keeps a (out, in) weight from the layout: bits, and dimensions the bit streams cannot fill."""
    problems = []
    if bits not in GPTQ_BITS:
        problems.append(f"{bits}-bit codes (the GPTQ layout holds {', '.join(map(str, GPTQ_BITS))} bits)")
    else:
        per_word = WORD_BITS // np.gcd(WORD_BITS, bits)  # codes that fill whole words: 32/b, or 32 for 3 bits
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % per_word:
                problems.append(f"{name} {size} is not a multiple of {per_word} ({bits}-bit codes fill whole words)")
    return problems


def to_gptq(weight: QuantizedWeight, zero_offset: int = 1) -> GPTQTensors:
    """A run's codes in the GPTQ layout; `zero_offset` 1 stores z - 1 (checkpoint_format gptq), 0 z (gptq_v2)."""
    codes, zeros = unsigned_codes(weight)
    bits = weight.bits
    stored_zeros = (zeros.to(torch.int16) - zero_offset).numpy() & ((1 << bits) - 1)  # (out, groups)
    in_features = weight.shape[1]
    return GPTQTensors(
        qweight=torch.from_numpy(_pack_stream(codes.numpy().T, bits)),  # codes (in, out) -> (in·b/32, out)
        qzeros=torch.from_numpy(_pack_stream(stored_zeros, bits).T.copy()),  # (out, groups) -> (groups, out·b/32)
        scales=weight.scale.T.to(torch.float16).contiguous(),  # (groups, out)
        g_idx=torch.arange(in_features, dtype=torch.int32) // weight.group_size,
    )


def from_gptq(tensors: GPTQTensors, bits: int, zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (in, out) uint8, zero points (groups, out) int16), read back as an engine reads them."""
    codes = _unpack_stream(tensors.qweight.numpy(), bits)  # (in, out)
    zeros = _unpack_stream(tensors.qzeros.numpy().T.copy(), bits).T  # (groups, out)
    return torch.from_numpy(codes), torch.from_numpy(zeros.astype(np.int16) + zero_offset)


def dequantize_gptq(tensors: GPTQTensors, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The (out, in) fp32 weight the layout stores: scales[g_idx[j], o] · (q[j, o] - z[g_idx[j], o])."""
    codes, zeros = from_gptq(tensors, bits, zero_offset)
    group = tensors.g_idx.long()  # (in,)
    values = tensors.scales.float()[group] * (codes.float() - zeros.float()[group])  # (in, out)
    return values.T.contiguous()


def read_gptq_config(folder: Path) -> dict | None:
    """The quantization_config of a GPTQ checkpoint folder, None for anything else."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    quantization = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    return quantization if quantization.get("quant_method") == "gptq" else None


def dequantized_state(folder: Path, quantization: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ checkpoint (any GPTQ tool's, desc_act included: g_idx is read) with each
    packed linear de-quantized to its (out, in) `.weight` in `dtype`."""
    from safetensors import safe_open

    bits = int(quantization["bits"])
    zero_offset = 0 if quantization.get("checkpoint_format") == "gptq_v2" else 1
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            state.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    for module in [name.removesuffix(".qweight") for name in state if name.endswith(".qweight")]:
        parts = GPTQTensors(*(state.pop(f"{module}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")))
        state[f"{module}.weight"] = dequantize_gptq(parts, bits, zero_offset).to(dtype)
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in state.items()}
