"""A Hugging Face model of the LLaMA, Qwen2/Qwen3, Phi-3, Gemma 3, Falcon, Mixtral or Qwen3-MoE families as a
GGUF file llama.cpp runs, written with the `gguf` package.

What the file needs beyond the weights, and where it comes from here:
- architecture metadata (``llama.*``, ``qwen2.*``, ``qwen3.*``, ``phi3.*``, ``gemma3.*`` keys) from the
  transformers config; for Gemma 3 also its sliding window, which layers slide (the config's
  layer_types), the sliding layers' rope base, and its norms' weights stored as 1 + w (llama.cpp's
  RMSNorm multiplies by the stored weight, Gemma's by 1 + w); Falcon's LayerNorm epsilon, and the
  fused q|k|v rows of its grouped layouts (40B/180B: per key/value group its queries, key and value)
  regrouped into llama.cpp's all-queries | all-keys | all-values (a row permutation, as for the rope);
- the tokenizer: copied key by key from the GGUF the model was loaded from when there is one
  (exactly what llama.cpp had), else built from ``tokenizer.json`` with the `gguf` package's
  vocab readers (BPE -> ``gpt2``, byte-fallback BPE -> ``llama``) and special tokens/merges;
- tensor names from the package's tensor-name map, and, for llama.cpp's LLaMA architecture, q/k rows
  reordered from transformers' rotate-half layout to the interleaved pairs its rope expects (a
  permutation of output rows: per-row and per-group grids move with their rows, unchanged); Qwen2,
  Qwen3 and Phi-3 run the rotate-half (NEOX) rope in llama.cpp, so their rows stay as they are.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.export.gguf_experts import add_experts
from omniquant_pl.quant.codes import QuantizedWeight

log = logging.getLogger(__name__)

# model_type -> llama.cpp architecture whose tensors and rope match transformers' blocks
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                      "gemma3_text": "gemma3", "falcon": "falcon", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
# architectures whose norms multiply by 1 + w (llama.cpp's by the stored weight: 1 + w is written)
NORM_WEIGHT_OFFSET = {"gemma3": 1.0}
# architectures whose rope llama.cpp applies to interleaved pairs (q/k rows reordered); the others use
# the rotate-half (NEOX) layout transformers has
INTERLEAVED_ROPE = ("llama",)
# BPE pre-tokenizers llama.cpp knows by name, for tokenizers that come from tokenizer.json
# (model_type, vocab size) -> name; others get llama.cpp's "default" with a warning
KNOWN_PRE_TOKENIZERS = {("llama", 128256): "llama-bpe", ("llama", 49152): "smollm"}


def gguf_architecture(model_type: str) -> str:
    if model_type not in GGUF_ARCHITECTURES:
        raise OmniQuantError(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))}; this run is "
            f"'{model_type}': export it with --format compressed-tensors"
        )
    return GGUF_ARCHITECTURES[model_type]


def model_arch(config):
    """The gguf package's MODEL_ARCH of the config's llama.cpp architecture (for its tensor-name map)."""
    import gguf

    arch = gguf_architecture(config.model_type)
    return next(value for value, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def rope_interleave_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k output rows per head from halves (d, d + hd/2) to pairs (2i, 2i+1)."""
    out = rows.shape[0]
    half = out // heads // 2
    # (heads, 2, hd/2, ...) -> (heads, hd/2, 2, ...): row h·hd + 2i + j <- h·hd + j·hd/2 + i
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rope_heads(hf_name: str, config) -> int | None:
    """Heads whose rows `hf_name` holds, if it is a q or k projection weight or bias of an architecture
    whose rope llama.cpp applies to interleaved pairs (those rows are permuted)."""
    if GGUF_ARCHITECTURES.get(config.model_type) not in INTERLEAVED_ROPE:
        return None
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(config.num_attention_heads)
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def kv_heads(config) -> int:
    if config.model_type == "falcon":  # multi-query 7B: one; the grouped layouts: num_kv_heads
        return int(config.num_kv_heads) if config.new_decoder_architecture or not config.multi_query else 1
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def falcon_grouped_qkv_rows(rows: torch.Tensor, config) -> torch.Tensor:
    """Falcon's grouped fused q|k|v rows (per key/value group: its query heads, then one key and one
    value head) as all queries, all keys, all values."""
    heads, groups = int(config.num_attention_heads), kv_heads(config)
    size = config.hidden_size // heads
    # (groups, its q heads + k + v, head_dim, ...)
    grouped = rows.reshape(groups, heads // groups + 2, size, *rows.shape[1:])
    return torch.cat([grouped[:, :-2].reshape(heads * size, *rows.shape[1:]),
                      grouped[:, -2].reshape(groups * size, *rows.shape[1:]),
                      grouped[:, -1].reshape(groups * size, *rows.shape[1:])])


def llama_cpp_row_order(hf_name: str, value, config):
    """`value` (a tensor or a QuantizedWeight) with q/k rows in llama.cpp's rope order (and Falcon's
    grouped q|k|v rows regrouped); other tensors as they are. A QuantizedWeight's codes, scales and
    zero points move with their rows."""
    heads = rope_heads(hf_name, config)
    if config.model_type == "falcon" and config.new_decoder_architecture and ".query_key_value." in hf_name:
        def reorder(rows: torch.Tensor) -> torch.Tensor:
            return falcon_grouped_qkv_rows(rows, config)
    elif heads is None:
        return value
    else:
        def reorder(rows: torch.Tensor) -> torch.Tensor:
            return rope_interleave_rows(rows, heads)

    return value.map_rows(reorder) if isinstance(value, QuantizedWeight) else reorder(value)


def _rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The rope of `layer_type`'s layers (configs with per-layer-type ropes, as Gemma 3's, hold one each)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama-3.1 rope scaling: base / scaled inverse frequencies
    (the scaled ones from transformers' own rope initialisation)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    base = 1.0 / (_rope_parameters(config)["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (base / scaled.double()).float().numpy()


def add_architecture(writer, config, name: str) -> None:
    """The ``general.*`` and ``llama.*`` keys of the model."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(getattr(config, "intermediate_size", None) or config.ffn_hidden_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(kv_heads(config))
    if config.model_type == "falcon":
        check_falcon(config)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    dim = head_dim(config)
    writer.add_rope_dimension_count(int(dim * float(getattr(config, "partial_rotary_factor", None) or 1.0)))
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):
        raise OmniQuantError(f"GGUF export supports rope scaling default, linear and llama3, not '{rope['rope_type']}'; "
                             "export this model with --format compressed-tensors")
    if gguf_architecture(config.model_type) == "gemma3":
        add_gemma3(writer, config)
    add_experts(writer, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def check_falcon(config) -> None:
    """llama.cpp's Falcon: parallel attention and MLP, rotary positions, no biases in the linears."""
    if getattr(config, "alibi", False) or not getattr(config, "parallel_attn", True) or getattr(config, "bias", False):
        raise OmniQuantError("llama.cpp's Falcon runs parallel-attention rotary models without linear biases (7B, 40B, "
                             "180B layouts); this one has ALiBi, sequential attention or biases: export it with "
                             "--format compressed-tensors")


def add_gemma3(writer, config) -> None:
    """Gemma 3's keys: sliding window, which layers slide, the sliding layers' rope base; a one-line
    refusal where llama.cpp's Gemma 3 would compute something else."""
    dim = head_dim(config)
    expected_scalar = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else dim
    if float(config.query_pre_attn_scalar) != float(expected_scalar):
        raise OmniQuantError(f"llama.cpp scales Gemma 3's queries by 1/sqrt({expected_scalar}), this model by "
                             f"1/sqrt({config.query_pre_attn_scalar}) (query_pre_attn_scalar): export it with "
                             "--format compressed-tensors")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise OmniQuantError("llama.cpp's Gemma 3 has no attention logit soft-capping: export this model with "
                             "--format compressed-tensors")
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    layer_types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        sliding = _rope_parameters(config, "sliding_attention")
        if sliding["rope_type"] != "default":
            raise OmniQuantError(f"llama.cpp's Gemma 3 runs its sliding layers' rope unscaled, this model's is "
                                 f"'{sliding['rope_type']}': export it with --format compressed-tensors")
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))


# -- tokenizer ------------------------------------------------------------------------------
def copy_tokenizer_from_gguf(writer, source: Path) -> None:
    """Every ``tokenizer.*`` key of the GGUF the model was loaded from, as it is."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def add_tokenizer_from_hf(writer, folder: Path, config) -> None:
    """A tokenizer.json (BPE) as GGUF vocab, scores, token types, merges and special tokens."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise OmniQuantError(f"{folder} has no tokenizer.json; GGUF export needs the model's fast tokenizer")
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise OmniQuantError(f"GGUF export reads BPE tokenizers from tokenizer.json, this one is {model.get('type')}; "
                             "export with --format compressed-tensors, or load the model from a GGUF to calibrate it")
    vocab = LlamaHfVocab(folder) if model.get("byte_fallback") else BpeVocab(folder)
    tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
    if len(tokens) > int(config.vocab_size):
        raise OmniQuantError(f"{folder / 'tokenizer.json'} has {len(tokens)} tokens but the model's embedding has "
                             f"{config.vocab_size} rows; llama.cpp needs one row per token: give the model its own tokenizer")
    for index in range(len(tokens), int(config.vocab_size)):  # rows of the embedding with no token
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        pre = KNOWN_PRE_TOKENIZERS.get((config.model_type, int(config.vocab_size)))
        if pre is None:
            log.warning("GGUF export: llama.cpp's pre-tokenizer for this tokenizer is unknown; using 'default' "
                        "(token ids fed directly are unaffected; text tokenization by llama.cpp may differ)")
        writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# -- tensors --------------------------------------------------------------------------------
@dataclass
class GGUFTensor:
    """One tensor to write: float data (written as F32) or already-quantized block bytes."""

    hf_name: str
    data: np.ndarray
    qtype: object | None = None  # gguf.GGMLQuantizationType of (out, row bytes) uint8 blocks; None = float


def gguf_name(tensor_map, hf_name: str) -> str:
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise OmniQuantError(f"llama.cpp's architecture has no tensor for '{hf_name}'; export this model with "
                             "--format compressed-tensors")
    return name


def write_gguf(path: Path, config, tensors: Iterator[GGUFTensor], name: str, tokenizer_gguf: Path | None,
               tokenizer_folder: Path | None, metadata: dict[str, object] | None = None) -> None:
    """Write a GGUF of a supported architecture: metadata, tokenizer, then each tensor (float ones as F32)."""
    import gguf

    arch = gguf_architecture(config.model_type)
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)  # tensors spool to disk, not RAM
    add_architecture(writer, config, name)
    if tokenizer_gguf is not None:
        copy_tokenizer_from_gguf(writer, tokenizer_gguf)
    else:
        add_tokenizer_from_hf(writer, tokenizer_folder, config)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_string(key, str(value))
    tensor_map = gguf.get_tensor_name_map(model_arch(config), int(config.num_hidden_layers))
    if _rope_parameters(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    for tensor in tensors:
        target = gguf_name(tensor_map, tensor.hf_name)
        if tensor.qtype is None:
            writer.add_tensor(target, np.ascontiguousarray(tensor.data, dtype=np.float32))
        else:
            writer.add_tensor(target, tensor.data, raw_dtype=tensor.qtype)  # (out, bytes): shape from the type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def float_tensor(hf_name: str, value: torch.Tensor, config) -> GGUFTensor:
    """A floating-point tensor in llama.cpp's layout (q/k rows interleaved; Gemma's norm weights as 1 + w)."""
    offset = NORM_WEIGHT_OFFSET.get(GGUF_ARCHITECTURES.get(config.model_type), 0.0)
    value = value.float() + offset if offset and hf_name.endswith("norm.weight") else value
    return GGUFTensor(hf_name, llama_cpp_row_order(hf_name, value, config).float().numpy())


def tied_output(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))
