"""What an evaluated model is stored as, read from its files: a compressed-tensors or GPTQ folder
(its config's quantization_config) or a GGUF file (its tensor types), so that `evaluate` and `compare`
label an exported model by its real format and bits (its size is the files', eval/size.disk_bytes)
rather than as full precision.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omniquant_pl.config import ModelConfig

# bits per weight of llama.cpp's weight types (their integer part)
GGUF_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q5_0": 5, "Q5_1": 5,
             "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "F16": 16, "BF16": 16, "F32": 32}


@dataclass
class StoredFormat:
    format: str  # e.g. "compressed-tensors pack-quantized", "GPTQ (gptq)", "GGUF Q4_0"
    bits: str  # the quantization tag, e.g. W4A16g32
    by_omniquant: bool  # exported by this project (its provenance is in the file)


def _compressed_tensors(folder: Path) -> StoredFormat | None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return None
    group = next(iter((quantization.get("config_groups") or {}).values()), {})
    weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
    size = weights.get("group_size") if weights.get("strategy") == "group" else None
    tag = f"W{weights.get('num_bits', '?')}A{inputs.get('num_bits', 16)}" + (f"g{size}" if size else "")
    return StoredFormat(f"compressed-tensors {quantization.get('format', '')}".strip(), tag,
                        "omniquant_export" in config)


def _gptq(folder: Path) -> StoredFormat | None:
    from omniquant_pl.export.gptq_layout import read_gptq_config

    quantization = read_gptq_config(folder)
    if quantization is None:
        return None
    size = quantization.get("group_size", -1)
    tag = f"W{quantization.get('bits', '?')}A16" + (f"g{size}" if size and size > 0 else "")
    fmt = quantization.get("checkpoint_format", "gptq")
    by_omniquant = "omniquant_export" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return StoredFormat(f"GPTQ ({fmt})", tag, by_omniquant)


def _gguf(path: Path) -> StoredFormat | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) > 1)
    if not types:
        return None
    main_type = types.most_common(1)[0][0]
    field = reader.get_field("general.quantized_by")
    by = bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field is not None else ""
    bits = GGUF_BITS.get(main_type, "?")
    return StoredFormat(f"GGUF {main_type}", f"W{bits}A16 ({main_type})", by == "omniquant-pl")


def stored_format(model: ModelConfig, folder: str | Path) -> StoredFormat | None:
    """The format `model` (found in `folder`) is stored in, None for float weights."""
    folder = Path(folder)
    if model.gguf_file:
        path = folder / model.gguf_file
        return _gguf(path) if path.is_file() else None
    return (_compressed_tensors(folder) or _gptq(folder)) if folder.is_dir() else None
