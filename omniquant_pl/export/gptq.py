"""GPTQ-layout export: 2-, 3-, 4- and 8-bit weight-only runs for vLLM's ``gptq`` method (and
GPTQModel-backed transformers), the way to serve a 2- or 3-bit run on a GPU engine.

Each block linear is written as qweight / qzeros / scales / g_idx (gptq_layout.py) from the run's
codes; embeddings, norms and the head stay in floating point. The config carries
``quantization_config`` (quant_method gptq, bits, group_size, sym, desc_act false,
checkpoint_format) and ``quantize_config.json`` holds the same. Zero points are stored minus one
(checkpoint_format ``gptq``, what every GPTQ engine reads) unless a zero point is 0, which that
convention cannot hold; such runs are written as ``gptq_v2`` (zero points as they are) and the
report says which engines read it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from omniquant_pl.config import QuantConfig
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.export import ExportConfig, register_exporter
from omniquant_pl.export.compressed_tensors import save_sharded
from omniquant_pl.export.gptq_layout import GPTQ_BITS, GPTQTensors, from_gptq, layout_problems, to_gptq, unsigned_codes
from omniquant_pl.export.run import CalibratedRun
from omniquant_pl.quant.codes import QuantizedWeight

MARLIN_GROUPS = (0, 32, 64, 128)  # vLLM's gptq_marlin: symmetric 4/8-bit with these groups (0 = per channel)


def check_exportable(quant: QuantConfig) -> None:
    """A one-line error for settings the layout cannot hold, naming what to do instead."""
    if quant.abits < 16:
        raise ConfigError(f"the GPTQ layout holds weight-only models; this run is {quant.tag}: export W8A8 runs with "
                          "--format compressed-tensors, or calibrate a weight-only run (quant.abits 16)")
    if quant.wbits not in GPTQ_BITS:
        raise ConfigError(f"the GPTQ layout holds {', '.join(map(str, GPTQ_BITS))}-bit weights; this run is "
                          f"{quant.tag}: calibrate with quant.wbits 2, 3, 4 or 8, or export it with --format gguf "
                          f"--gguf-type Q{quant.wbits}_K --requantize (approximate)")
    if quant.grid == "gguf" and not quant.symmetric:
        raise ConfigError("the GPTQ layout stores integer zero points; this run uses quant.grid gguf (a real-valued "
                          "minimum): export it with --format gguf, or calibrate with quant.grid minmax")


def checkpoint_format(run: CalibratedRun) -> str:
    """``gptq`` (zero points minus one) unless some zero point is 0, which only ``gptq_v2`` holds."""
    if run.quant.symmetric:
        return "gptq"
    for block in range(run.num_blocks):
        if any(weight.zero.min().item() == 0 for weight in run.block_codes(block).values()):
            return "gptq_v2"
    return "gptq"


def quantization_config(quant: QuantConfig, fmt: str) -> dict:
    return {"quant_method": "gptq", "bits": quant.wbits, "group_size": quant.group_size or -1, "desc_act": False,
            "sym": quant.symmetric, "lm_head": False, "true_sequential": True, "checkpoint_format": fmt}


def _write_config(run: CalibratedRun, staging: Path, qconfig: dict, dtype: str) -> None:
    config = json.loads((run.model_dir / "config.json").read_text())
    provenance = config.pop("omniquant", None) or {}
    config["omniquant_export"] = {"method": provenance.get("method"), "quant": run.quant.tag, "format": "gptq",
                                  "from_run": run.run_dir.name}
    config["quantization_config"] = qconfig
    config["use_cache"] = True
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))


def verify_written(folder: Path, run: CalibratedRun, zero_offset: int) -> int:
    """Read every linear back from the written files, unpack it and check it holds the run's codes and
    zero points as an engine reads them, and its scales in fp16; returns how many."""
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for path in sorted(folder.glob("*.safetensors"))]
    written = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118 (safe_open handles)
    for key, (block, name) in run.linear_keys().items():
        module = key.removesuffix(".weight")
        weight = run.block_codes(block)[name]
        stored = GPTQTensors(*(written[f"{module}.{part}"].get_tensor(f"{module}.{part}")
                               for part in ("qweight", "qzeros", "scales", "g_idx")))
        codes, zeros = unsigned_codes(weight)
        read_codes, read_zeros = from_gptq(stored, weight.bits, zero_offset)
        if not (torch.equal(read_codes, codes.T) and torch.equal(read_zeros, zeros.T.to(torch.int16))
                and torch.equal(stored.scales, weight.scale.T.half())):
            raise OmniQuantError(f"the written files do not hold the run's integers for {key}, so nothing was written; "
                                 "please report it with your safetensors version")
    return len(run.linear_keys())


@register_exporter("gptq")
def export_gptq(run: CalibratedRun, options: ExportConfig, staging: Path) -> dict:
    check_exportable(run.quant)
    fmt = checkpoint_format(run)
    zero_offset = 1 if fmt == "gptq" else 0
    dtype = getattr(torch, options.dtype)
    state: dict[str, torch.Tensor] = {}
    float_bytes = linears = 0
    for key, value in run.tensors_in_order():
        if isinstance(value, QuantizedWeight):
            problems = layout_problems(*value.shape, value.bits)
            if problems:
                raise OmniQuantError(f"{key} cannot be stored in the GPTQ layout: {'; '.join(problems)}; export it "
                                     "with --format gguf or compressed-tensors")
            state.update(to_gptq(value, zero_offset).state(key.removesuffix(".weight")))
            float_bytes += value.codes.numel() * 2
            linears += 1
        else:
            state[key] = value.to(dtype) if value.is_floating_point() else value
            float_bytes += value.numel() * 2
    files = save_sharded(state, staging)
    del state
    verified = verify_written(staging, run, zero_offset)
    qconfig = quantization_config(run.quant, fmt)
    _write_config(run, staging, qconfig, options.dtype)
    for path in run.side_files():
        shutil.copy2(path, staging / path.name)
    weight_bytes = sum(path.stat().st_size for path in files)
    values_exact = run.quant.grid == "gguf"  # the run's scales are fp16 values already
    notes = []
    if not values_exact:
        notes.append("scales stored in fp16 as the GPTQ format does: weights equal the run's up to that rounding")
    if fmt == "gptq_v2":
        notes.append("some zero points are 0, which checkpoint_format gptq (zero minus one) cannot hold: written as "
                     "gptq_v2, which vLLM's gptq method and GPTQModel read; older GPTQ loaders do not")
    marlin = run.quant.symmetric and run.quant.wbits in (4, 8) and run.quant.group_size in MARLIN_GROUPS
    return {
        "checkpoint_format": fmt,
        "exact": True,  # the run's integers, bit for bit: read back and compared
        "verified_tensors": verified,
        "values_exact": values_exact,
        "quantized_linears": linears,
        "weight_bytes": weight_bytes,
        "fp16_bytes": float_bytes,
        "size_vs_fp16": round(weight_bytes / float_bytes, 4),
        "engines": f"vLLM (--quantization {'gptq_marlin' if marlin else 'gptq'}), transformers with GPTQModel",
        "notes": notes,
    }
