"""GGUF export for llama.cpp / Ollama.

Exact types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): a run calibrated on that type's grid with groups of
32 is written block by block from its codes (see gguf_blocks), then llama.cpp's quantizer gives
the token embeddings and output their default types and copies the run's blocks unchanged (checked
byte for byte). Any other type, or an exact type whose grid the run does not have, needs
``--requantize``: llama.cpp re-rounds the run's fused weights into the type, and the file and
the report say the result is approximate. Float types (F32, F16, BF16) store the fused weights.
A mixture of experts' expert tensors are written as llama.cpp's gate, up and down stacks
(gguf_experts.py), exactly like the linears.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from omniquant_pl.arch.registry import get_arch_for_config
from omniquant_pl.config import QuantConfig
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.export import ExportConfig, register_exporter
from omniquant_pl.export.gguf_blocks import BLOCK, EXACT_TYPES, exact_gguf_type, pack_linear
from omniquant_pl.export.gguf_experts import expert_count, float_stacks, stack_key
from omniquant_pl.export.gguf_model import (
    GGUFTensor,
    float_tensor,
    gguf_architecture,
    gguf_name,
    llama_cpp_row_order,
    model_arch,
    tied_output,
    write_gguf,
)
from omniquant_pl.export.llama_cpp import ALIASES, file_type, quantize_gguf
from omniquant_pl.export.run import CalibratedRun
from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.gguf_mix import ModelShape, linear_type

FLOAT_TYPES = ("F32", "F16", "BF16")
INTERMEDIATE = "intermediate.gguf"


def exact_config_hint(type_name: str) -> str:
    exact = EXACT_TYPES[type_name]
    grid = ", quant.grid gguf" if exact.bits < 8 else ""
    return (f"quant.wbits {exact.bits}, quant.symmetric {str(exact.symmetric).lower()}, quant.group_size {BLOCK}"
            f"{grid}, quant.abits 16 (e.g. configs/smollm2-135m/gguf-{type_name.lower()}.yaml)")


def plan(quant: QuantConfig, type_name: str, requantize: bool) -> str:
    """``exact``, ``float`` or ``requantize`` for the run's grid and the asked type; one-line errors
    for a request that cannot be met."""
    file_type(type_name)  # a type llama.cpp knows
    if quant.abits < 16:
        raise ConfigError(
            f"GGUF holds weight-only models; this run is {quant.tag} (activations quantized too): export it with "
            "--format compressed-tensors (W8A8), or calibrate a weight-only run"
        )
    if type_name in FLOAT_TYPES:
        return "float"
    exact = EXACT_TYPES.get(type_name)
    if quant.gguf_type is not None and ALIASES.get(type_name, type_name) == quant.gguf_type:
        return "exact"  # every linear on the type llama.cpp stores it in for this file type
    if quant.gguf_type is None and exact_gguf_type(quant) == type_name:
        return "exact"
    if requantize:
        return "requantize"
    if quant.gguf_type is not None:
        raise ConfigError(f"this run was calibrated for {quant.gguf_type}: export it with --gguf-type {quant.gguf_type} "
                          f"(or no --gguf-type), or add --requantize to re-round it into {type_name} (approximate)")
    if exact is not None:
        raise ConfigError(
            f"this run ({quant.tag}, {'symmetric' if quant.symmetric else 'asymmetric'}) is not on {type_name}'s grid; "
            f"calibrate with {exact_config_hint(type_name)}, or add --requantize to re-round it (approximate)"
        )
    raise ConfigError(
        f"{type_name} is not an exact target (llama.cpp's own grid); add --requantize to re-round the run's fused "
        f"weights into it (approximate), or export an exact type: {', '.join(EXACT_TYPES)}"
    )


def run_tensors(run: CalibratedRun, type_name: str, mode: str) -> Iterator[GGUFTensor]:
    """The run's tensors in GGUF order: block linears as exact blocks or fused floats, the rest as floats."""
    import gguf

    config = run.hf_config
    linears = run.linear_keys()
    experts = expert_count(config)
    for hf_name, value in run.tensors_in_order():
        if hf_name == "lm_head.weight" and tied_output(config):
            continue
        stacked = hf_name not in linears and isinstance(value, QuantizedWeight)  # a mixture's expert stack
        if not isinstance(value, QuantizedWeight):
            yield float_tensor(hf_name, value, config)
        elif mode == "exact":
            stored_type = (None if stacked else linear_gguf_type(run, *linears[hf_name], value.shape[1])) or type_name
            value = llama_cpp_row_order(hf_name, value, config)
            packed = pack_linear(stored_type, value)  # (rows, bytes)
            packed = packed.reshape(experts, -1, packed.shape[1]) if stacked else packed  # (experts, rows, bytes)
            yield GGUFTensor(hf_name, packed, getattr(gguf.GGMLQuantizationType, stored_type))
        else:
            dense = value.dequantize()
            yield float_tensor(hf_name, dense.reshape(experts, -1, dense.shape[1]) if stacked else dense, config)


def linear_gguf_type(run: CalibratedRun, block: int, name: str, in_features: int) -> str | None:
    """The type a run calibrated for a GGUF file type (quant.gguf_type) stores one linear in; None otherwise."""
    if run.quant.gguf_type is None:
        return None
    return linear_type(run.quant.gguf_type, name, block, in_features, ModelShape.of(run.hf_config))


def _source_gguf(run: CalibratedRun) -> Path | None:
    """The GGUF file the run's model was loaded from (for its tokenizer), if it is still there."""
    from omniquant_pl.models import resolve_model_path

    gguf_file = run.model_config.get("gguf_file")
    if not gguf_file:
        return None
    try:
        path = Path(resolve_model_path(run.model_config["name_or_path"])) / gguf_file
    except ConfigError:
        return None
    return path if path.is_file() else None


def model_name(run: CalibratedRun) -> str:
    """A file-name-safe model name: the source GGUF's stem without its type suffix, else the last
    part of the hub id or folder."""
    gguf_file = run.model_config.get("gguf_file")
    if gguf_file:
        return re.sub(r"[.-](I?Q\d\w*|B?F16|F32)$", "", Path(gguf_file).stem, flags=re.IGNORECASE)
    name = run.model_config["name_or_path"].removeprefix("pkg:").rstrip("/")
    return Path(name).name or run.run_dir.name


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}


def _check_blocks_kept(intermediate: Path, final: Path) -> int:
    """The exact (already quantized) tensors must reach the final file in their types, byte for byte;
    returns how many there are."""
    import gguf

    before = {t.name: t for t in gguf.GGUFReader(str(intermediate)).tensors if t.tensor_type.name not in FLOAT_TYPES}
    after = {t.name: t for t in gguf.GGUFReader(str(final)).tensors}
    changed = [name for name, t in before.items()
               if after[name].tensor_type != t.tensor_type or bytes(after[name].data) != bytes(t.data)]
    if changed:
        raise OmniQuantError(
            f"llama.cpp's quantizer changed {len(changed)} exact tensors (e.g. {changed[0]}: "
            f"{before[changed[0]].tensor_type.name} -> {after[changed[0]].tensor_type.name}), so nothing was written; "
            "add --requantize for an approximate file, and please report it with your llama-cpp-python version"
        )
    return len(before)


def verify_exact(final: Path, run: CalibratedRun, values_exact: bool) -> int:
    """Read every block linear back from the written file with gguf-py's own de-quantizer and check
    that it holds the run's integers: each value within a third of its step of the run's de-quantized
    codes (in llama.cpp's row order; a code off by one is a whole step away), or equal where the run's
    scales are fp16 values already (quant.grid gguf). Returns how many tensors were checked."""
    import gguf
    from gguf.quants import dequantize

    stored_tensors = {t.name: t for t in gguf.GGUFReader(str(final)).tensors}
    tensor_map = gguf.get_tensor_name_map(model_arch(run.hf_config), run.num_blocks)
    stacks = {stack_key(run.block_prefix(block), run.spec.experts.module, stack): codes
              for block in range(run.num_blocks if run.spec.experts else 0)
              for stack, codes in run.expert_stacks(block, check=False).items()}  # checked while writing
    linears = {key: run.block_codes(block)[name] for key, (block, name) in run.linear_keys().items()}
    for key, codes in {**linears, **stacks}.items():
        codes = llama_cpp_row_order(key, codes, run.hf_config)  # checked while writing
        tensor = stored_tensors[gguf_name(tensor_map, key)]
        stored = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).reshape(codes.shape)  # (out, in)
        step = codes.scale.abs().repeat_interleave(codes.group_size, dim=1)  # (out, in)
        error = (stored - codes.dequantize()).abs()
        wrong = error > 0 if values_exact else error > step / 3
        if wrong.any():
            raise OmniQuantError(f"the written file does not hold the run's integers for {key} ({int(wrong.sum())} "
                                 f"values differ, up to {error.max().item():.3g}), so nothing was written; please "
                                 "report it with your gguf and llama-cpp-python versions")
    return len(linears) + len(stacks)


@register_exporter("gguf")
def export_gguf(run: CalibratedRun, options: ExportConfig, staging: Path) -> dict:
    type_name = options.gguf_type
    gguf_architecture(run.hf_config.model_type)
    mode = plan(run.quant, type_name, options.requantize)
    if mode == "exact" and expert_count(run.hf_config) == 8:
        raise ConfigError(f"llama.cpp stores an 8-expert model's attn_k and attn_v in Q8_0 whatever the file type, "
                          f"and this run's are on {type_name}'s grid: add --requantize to re-round them (approximate)")
    tokenizer_gguf = _source_gguf(run)
    name = model_name(run)
    metadata = {"general.quantized_by": "omniquant-pl", "omniquant.quant": run.quant.tag,
                "omniquant.exact": mode == "exact", "omniquant.approximate": mode == "requantize"}
    intermediate = staging / INTERMEDIATE
    write_gguf(intermediate, run.hf_config, run_tensors(run, type_name, mode), name, tokenizer_gguf,
               None if tokenizer_gguf else run.model_dir, metadata)
    final = staging / f"{name}-{run.quant.tag}-{type_name}.gguf"
    quantize_gguf(intermediate, final, type_name)
    kept = _check_blocks_kept(intermediate, final) if mode == "exact" else 0
    intermediate.unlink()
    values_exact = mode == "exact" and (run.quant.grid == "gguf" or run.quant.gguf_type is not None)  # fp16 d, m
    verified = verify_exact(final, run, values_exact) if mode == "exact" else 0
    types = tensor_types(final)
    counts = dict(Counter(types.values()))
    notes = []
    if mode == "requantize":
        notes.append(f"APPROXIMATE: llama.cpp re-rounded the run's fused {run.quant.tag} weights into {type_name}; "
                     "the run's own grid is not what the file stores")
    fallbacks = sorted({t for n, t in types.items() if n.startswith("blk.") and t not in (type_name, "F32")})
    if fallbacks and mode != "exact":
        notes.append(f"llama.cpp stored some block tensors as {', '.join(fallbacks)} (its rules for {type_name})")
    if mode == "exact" and not values_exact:
        notes.append("d (and m) stored in fp16 as GGUF does: weights equal the run's up to that rounding "
                     "(a run with quant.grid gguf stores them exactly)")
    return {
        "file": final.name,
        "gguf_type": type_name,
        "mode": mode,
        "exact": mode == "exact",  # the run's integers, bit for bit
        "values_exact": values_exact,
        "exact_tensors": kept,
        "verified_tensors": verified,  # read back from the file and compared with the run's codes
        "tensor_types": counts,
        "file_bytes": final.stat().st_size,
        "tokenizer": "copied from the source GGUF" if tokenizer_gguf else "built from tokenizer.json",
        "engines": "llama.cpp, Ollama, LM Studio (llama.cpp-based); transformers (gguf_file=, de-quantized)",
        "notes": notes,
    }


def model_to_gguf(model, path: Path, type_name: str, tokenizer_gguf: Path | None = None,
                  tokenizer_folder: Path | None = None) -> dict[str, str]:
    """An unquantized transformers LLaMA-family model as a GGUF of `type_name`, the way llama.cpp's
    own tools make one: every tensor written as F32, then llama.cpp's quantizer. Returns the
    file's tensor types. (The baseline a run's export is compared with.)"""
    config = model.config
    state = model.state_dict()
    spec = get_arch_for_config(config)
    if spec.experts is not None:  # fused 3-D expert tensors -> llama.cpp's gate, up and down stacks
        prefixes = [f"{spec.backbone}.{spec.layers}.{i}." for i in range(int(config.num_hidden_layers))]
        state = float_stacks(state, config, prefixes, spec.experts.module, spec.experts.gate_up, spec.experts.down)
    tensors = (float_tensor(name, value.detach(), config) for name, value in state.items()
               if not (name == "lm_head.weight" and tied_output(config)))
    intermediate = path.with_name(path.name + ".f32.tmp")
    name = Path(getattr(config, "_name_or_path", "") or "model").name
    try:
        write_gguf(intermediate, config, tensors, name, tokenizer_gguf, tokenizer_folder)
        quantize_gguf(intermediate, path, type_name)
    finally:
        intermediate.unlink(missing_ok=True)
    return tensor_types(path)
