"""Model size: bytes on disk of a saved checkpoint and the size a packed low-bit export would have.

The saved OmniQuant model is fake-quantized (float weights on the low-bit grid), so its disk size
equals the float model's; the packed estimate is what the same weights take as `wbits`-bit
integers plus one fp16 scale (and, asymmetric, one zero point) per output channel or group, with
every other parameter (embeddings, norms, head) in fp16.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from omniquant_pl.config import QuantConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
HALF_BYTES = 2


def disk_bytes(path: str | Path, gguf_file: str | None = None) -> int | None:
    """Bytes of the weight files of a local model folder (or of its GGUF file); None if not local."""
    folder = Path(path)
    if gguf_file:
        return (folder / gguf_file).stat().st_size if (folder / gguf_file).is_file() else None
    if not folder.is_dir():
        return None
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    return sum(f.stat().st_size for f in files) or None


def packed_bytes(model: nn.Module, quant: QuantConfig | None = None) -> int:
    """Estimated bytes of `model` with its block linears (and 3-D expert tensors, per expert and
    output channel) packed to quant.wbits (None/16 bits: all fp16)."""
    unique = {id(p): p for p in model.parameters()}  # tied embeddings count once
    total = sum(p.numel() for p in unique.values()) * HALF_BYTES
    if quant is None or quant.wbits >= 16:
        return total
    from omniquant_pl.arch import get_arch
    from omniquant_pl.arch.registry import get_blocks

    spec = get_arch(model)
    for block in get_blocks(model, spec):
        weights = [block.get_submodule(name).weight for name in spec.linear_names]  # (out, in)
        weights += [block.get_parameter(name).flatten(0, 1) for name in spec.expert_tensors]  # (E·out, in)
        for weight in weights:
            out_features, in_features = weight.shape
            groups = in_features // quant.group_size if quant.group_size else 1
            params_per_group = 1 if quant.symmetric else 2  # scale (+ zero point)
            total -= weight.numel() * HALF_BYTES
            total += (weight.numel() * quant.wbits + 7) // 8 + out_features * groups * params_per_group * HALF_BYTES
    return total
