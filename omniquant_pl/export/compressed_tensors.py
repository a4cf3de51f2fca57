"""compressed-tensors export: the format vLLM serves natively and transformers loads.

Weight-only runs (4 or 8 bits, per channel or grouped, symmetric or with zero points) become
``pack-quantized`` linears: the run's codes packed into int32 by the compressed-tensors package,
with their scales and (asymmetric) packed zero points. W8A8 runs (symmetric per-channel int8
weights, per-token dynamic int8 activations) become ``int-quantized`` linears with the activation
scheme in the config. Embeddings, norms and the head stay in floating point (the head and any
other linear outside the blocks is listed under ``ignore``).

compressed-tensors stores signed codes on [-2^(b-1), 2^(b-1) - 1] and dequantizes (q - zp) · s; the
run's asymmetric codes live on [0, 2^b - 1], so codes and zero points shift by 2^(b-1) together and
(q - zp) is unchanged. Symmetric codes are already signed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from omniquant_pl.config import QuantConfig
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.export import ExportConfig, register_exporter
from omniquant_pl.export.run import CalibratedRun
from omniquant_pl.quant.codes import QuantizedWeight

WEIGHT_ONLY_BITS = (4, 8)  # what vLLM's WNA16 kernels take (zero points: 4 and 8 bits)
MARLIN_GROUPS = (0, 32, 64, 128)  # group sizes vLLM's Marlin kernels take (0 = per channel)
# the llama.cpp type to re-round a run into when compressed-tensors cannot hold it
GGUF_INSTEAD = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}
MAX_SHARD = "5GB"


def _require_package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise OmniQuantError("--format compressed-tensors needs the compressed-tensors package: "
                             'pip install -e ".[export]"') from err


def check_exportable(quant: QuantConfig) -> str:
    """The compressed-tensors format of a run's settings, or a one-line error naming what to do."""
    if quant.rotate_online != "none":
        raise ConfigError(f"this run rotates linear inputs at inference (quant.rotate_online {quant.rotate_online}), which "
                          "no engine reading compressed-tensors runs; evaluate it with omniquant evaluate, or calibrate "
                          "with quant.rotate_online: none to export it")
    if quant.grid == "gguf" and not quant.symmetric:
        gguf_type = f"Q{quant.wbits}_1" if quant.wbits in (4, 5) and quant.group_size == 32 else None
        instead = f"--gguf-type {gguf_type}" if gguf_type else f"--gguf-type {GGUF_INSTEAD[quant.wbits]} --requantize"
        raise ConfigError(
            "compressed-tensors stores integer zero points; this run uses quant.grid gguf (a real-valued minimum): "
            f"export it with --format gguf {instead}, or calibrate with quant.grid minmax"
        )
    if quant.abits == 16:
        if quant.wbits not in WEIGHT_ONLY_BITS:
            instead = ("--format gptq (vLLM's gptq method, exact) or " if quant.wbits in (2, 3) else "") + (
                f"--format gguf --gguf-type {GGUF_INSTEAD[quant.wbits]} --requantize (approximate)")
            raise ConfigError(f"compressed-tensors for vLLM holds 4- or 8-bit weights; this run is {quant.tag}: export "
                              f"it with {instead}, or calibrate with quant.wbits 4")
        return "pack-quantized"
    if (quant.wbits, quant.abits) == (8, 8):
        if not quant.symmetric or quant.group_size:
            raise ConfigError(
                f"vLLM serves int8 W8A8 with symmetric per-channel weights; this run is {quant.tag} "
                f"({'symmetric' if quant.symmetric else 'asymmetric'}): calibrate with quant.symmetric true and "
                "quant.group_size 0 to export it"
            )
        return "int-quantized"
    raise ConfigError(
        f"no inference engine serves {quant.tag} from compressed-tensors (weight-activation exports: W8A8 only); "
        "export a weight-only run (W4A16, W8A16, optionally grouped) or a symmetric W8A8 run instead"
    )


def quantization_config(quant: QuantConfig, compression_format: str, ignore: list[str]):
    """The compressed-tensors QuantizationConfig of the run's settings (its own pydantic models)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=quant.wbits, type="int", symmetric=quant.symmetric, dynamic=False,
        strategy="group" if quant.group_size else "channel", group_size=quant.group_size or None,
    )
    activations = None
    if quant.abits < 16:  # per-token dynamic asymmetric, as the run quantized every linear input
        activations = QuantizationArgs(num_bits=quant.abits, type="int", symmetric=False, dynamic=True, strategy="token")
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    return QuantizationConfig(config_groups={"group_0": scheme}, format=compression_format,
                              quantization_status="compressed", ignore=ignore)


def signed_codes(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, zero point) as compressed-tensors' signed int8: asymmetric ones shift by 2^(b-1)."""
    if weight.symmetric:
        return weight.codes.to(torch.int8), None
    offset = 1 << (weight.bits - 1)
    return ((weight.codes.to(torch.int16) - offset).to(torch.int8),
            (weight.zero.to(torch.int16) - offset).to(torch.int8))


def compressed_linear_state(module: str, weight: QuantizedWeight, compression_format: str,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one compressed linear, named as compressed-tensors loads them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, zero = signed_codes(weight)
    state = {f"{module}.weight_scale": weight.scale.to(dtype)}  # (out, groups)
    if compression_format == "pack-quantized":
        state[f"{module}.weight_packed"] = pack_to_int32(codes, weight.bits)  # (out, in·bits/32) int32
        state[f"{module}.weight_shape"] = torch.tensor(weight.shape)
        if zero is not None:
            state[f"{module}.weight_zero_point"] = pack_to_int32(zero, weight.bits, packed_dim=0)
    else:  # int-quantized: one int8 per weight
        state[f"{module}.weight"] = codes
        if zero is not None:
            state[f"{module}.weight_zero_point"] = zero
    return state


def unquantized_linears(run: CalibratedRun) -> list[str]:
    """Names of the model's nn.Linear modules outside the quantized block linears (e.g. lm_head)."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(run.hf_config)
    quantized = {name.removesuffix(".weight") for name in run.linear_keys()}
    return [name for name, module in skeleton.named_modules() if isinstance(module, nn.Linear) and name not in quantized]


def save_sharded(state: dict[str, torch.Tensor], folder: Path) -> list[Path]:
    """safetensors shards (with an index when there are several), as save_pretrained writes them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD)
    written = []
    for filename, names in split.filename_to_tensors.items():
        try:
            save_file({name: state[name].contiguous() for name in names}, str(folder / filename), metadata={"format": "pt"})
        except SafetensorError as err:  # safetensors reports a full disk as its own error: make it the OSError it is
            code = re.search(r"code: (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(folder / filename)) from None
        written.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written


def _write_config(run: CalibratedRun, staging: Path, options: ExportConfig, qconfig) -> None:
    from compressed_tensors.compressors import ModelCompressor

    config = json.loads((run.model_dir / "config.json").read_text())
    provenance = config.pop("omniquant", None) or {}
    config["omniquant_export"] = {  # not "omniquant": evaluate must not re-install fake quantizers
        "method": provenance.get("method"), "quant": run.quant.tag, "format": "compressed-tensors",
        "from_run": run.run_dir.name,
    }
    config["use_cache"] = True
    config["dtype"] = options.dtype
    if "torch_dtype" in config:  # older transformers' name for it
        config["torch_dtype"] = options.dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    ModelCompressor(quantization_config=qconfig).update_config(str(staging))  # adds quantization_config


def verify_written(folder: Path, run: CalibratedRun, compression_format: str) -> int:
    """Read every quantized linear back from the written files, unpack it with compressed-tensors' own
    helpers and check it holds the run's integers (codes and zero points); returns how many."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for path in sorted(folder.glob("*.safetensors"))]
    written = {name: handle for handle in handles for name in handle.keys()}

    def read(name: str) -> torch.Tensor:
        return written[name].get_tensor(name)

    for key, (block, name) in run.linear_keys().items():
        module = key.removesuffix(".weight")
        codes, zero = signed_codes(run.block_codes(block)[name])  # checked against the saved model while writing
        if compression_format == "pack-quantized":
            stored = unpack_from_int32(read(f"{module}.weight_packed"), run.quant.wbits, codes.shape)
            stored_zero = None if zero is None else unpack_from_int32(
                read(f"{module}.weight_zero_point"), run.quant.wbits, zero.shape, packed_dim=0)
        else:
            stored = read(f"{module}.weight")
            stored_zero = None if zero is None else read(f"{module}.weight_zero_point")
        if not torch.equal(stored.to(torch.int8), codes) or (zero is not None and not torch.equal(stored_zero.to(torch.int8), zero)):
            raise OmniQuantError(f"the written files do not hold the run's integers for {key}, so nothing was written; "
                                 "please report it with your compressed-tensors version")
    return len(run.linear_keys())


@register_exporter("compressed-tensors")
def export_compressed_tensors(run: CalibratedRun, options: ExportConfig, staging: Path) -> dict:
    compression_format = check_exportable(run.quant)
    _require_package()
    dtype = getattr(torch, options.dtype)
    state: dict[str, torch.Tensor] = {}
    float_bytes = linears = 0
    for key, value in run.tensors_in_order():
        if isinstance(value, QuantizedWeight):
            state.update(compressed_linear_state(key.removesuffix(".weight"), value, compression_format, dtype))
            float_bytes += value.codes.numel() * 2
            linears += 1
        else:
            state[key] = value.to(dtype) if value.is_floating_point() else value
            float_bytes += value.numel() * 2
    ignore = unquantized_linears(run)
    qconfig = quantization_config(run.quant, compression_format, ignore)
    files = save_sharded(state, staging)
    del state
    verified = verify_written(staging, run, compression_format)
    _write_config(run, staging, options, qconfig)
    for path in run.side_files():
        shutil.copy2(path, staging / path.name)
    weight_bytes = sum(path.stat().st_size for path in files)
    notes = []
    if run.quant.abits < 16:
        notes.append("the run also quantized attention q/k/v per token; engines run attention in floating point")
    if run.quant.group_size not in MARLIN_GROUPS:
        notes.append(f"vLLM's Marlin kernels take groups of 32, 64 or 128 (or per channel), not {run.quant.group_size}; "
                     "transformers loads it")
    # the run's scales are fp16 values on llama.cpp's grid; otherwise fp16/bf16 storage rounds them
    values_exact = options.dtype == "float32" or (run.quant.grid == "gguf" and options.dtype == "float16")
    if not values_exact:
        notes.append(f"scales stored in {options.dtype}: weights equal the run's up to that rounding (--dtype float32 keeps them)")
    return {
        "compression_format": compression_format,
        "exact": True,  # the run's integers, bit for bit: read back and compared
        "verified_tensors": verified,
        "values_exact": values_exact,
        "scales_dtype": options.dtype,
        "quantized_linears": linears,
        "ignored": ignore,
        "weight_bytes": weight_bytes,
        "fp16_bytes": float_bytes,
        "size_vs_fp16": round(weight_bytes / float_bytes, 4),
        "engines": "vLLM (CompressedTensorsWNA16 / W8A8Int8), transformers (compressed-tensors installed)",
        "notes": notes,
    }
