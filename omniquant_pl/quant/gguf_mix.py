"""llama.cpp's per-tensor types: which GGUF type each block linear gets in a file type ("mix").

A GGUF file type such as ``Q4_K_M`` is not one type: llama.cpp's quantizer (``llama_tensor_get_type``
in its ``src/llama-quant.cpp``) starts from the file type's default type and moves some tensors up —
``attn_v`` and ``ffn_down`` by layer, ``attn_output`` for the 2/3-bit mixes — and then replaces a
type whose block does not divide the row (K-quants need rows that are multiples of 256) by a
fallback. `linear_type` reproduces those rules for the dense decoder block linears of the LLaMA
family, without an importance matrix; a run that targets a file type is calibrated linear by linear
on the type llama.cpp will store (tests compare with the types llama.cpp itself writes).

Rules for the K-quant mixes (i = the layer, n = the number of layers, more(i) = i < n/8 or
i >= 7n/8 or (i - n/8) % 3 == 2, gqa = query heads per key/value head):

    attn_v       Q2_K: Q4_K if gqa >= 4 else Q3_K;  Q2_K_S: Q4_K if gqa >= 4;  Q3_K_M: Q5_K if i < 2 else Q4_K;
                 Q3_K_L: Q5_K;  Q4_K_M, Q5_K_M: Q6_K if more(i);  Q4_K_S: Q5_K if i < 4;  IQ4_NL, IQ4_XS: Q5_K
                 if gqa >= 4;  a 70B Llama (80 layers, grouped-query): Q3_K/Q4_K become Q5_K
    ffn_down     Q2_K: Q3_K;  Q2_K_S: Q4_K if i < n/8;  Q3_K_M: Q5_K if i < n/16 else Q4_K;  Q3_K_L: Q5_K;
                 Q4_K_M, Q5_K_M: Q6_K if more(i);  Q4_K_S: Q5_K if i < n/8;  IQ4_NL, IQ4_XS: Q5_K if i < n/8
    attn_output  Q2_K: Q3_K;  Q3_K_M: Q4_K;  Q3_K_L: Q5_K
    fallback     rows not a multiple of the type's block: Q2_K, Q3_K -> Q4_0;  Q4_K -> Q5_0;  Q5_K -> Q5_1;
                 Q6_K -> Q8_0;  IQ4_XS -> IQ4_NL;  and F16 when even that block does not divide the row
"""
from __future__ import annotations

from dataclasses import dataclass

from omniquant_pl.errors import ConfigError

# file type -> the type of tensors no rule moves (llama.cpp's llama_model_quantize_impl)
FILE_TYPE_DEFAULTS = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
}
BLOCK_SIZES = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32,
               "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama-quantize's names for the _M mixes
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
# the linear names of the LLaMA-family block -> llama.cpp's tensor roles
ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


@dataclass(frozen=True)
class ModelShape:
    """What the rules read from the model: layers, query heads per key/value head, and whether llama.cpp
    sees it as a 70B Llama (80 layers with grouped-query attention)."""

    layers: int
    gqa: int
    is_70b: bool = False

    @classmethod
    def of(cls, config) -> ModelShape:
        heads = int(getattr(config, "num_attention_heads", None) or 1)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        layers = int(getattr(config, "num_hidden_layers", None) or 1)
        return cls(layers, heads // kv_heads, layers == 80 and kv_heads != heads)


def check_file_type(name: str, option: str = "quant.gguf_type") -> str:
    """The file type `name` names (upper case; llama-quantize's aliases resolved), or a one-line error."""
    upper = ALIASES.get(str(name).upper(), str(name).upper())
    if upper not in FILE_TYPE_DEFAULTS:
        raise ConfigError(f"{option} '{name}' is not a GGUF file type this project knows; one of: "
                          f"{', '.join(FILE_TYPE_DEFAULTS)}")
    return upper


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _mixed_type(file_type: str, role: str, layer: int, shape: ModelShape) -> str:
    """The type llama.cpp's mix rules give a tensor, before the fallback for its row length."""
    n, gqa = shape.layers, shape.gqa
    chosen = FILE_TYPE_DEFAULTS[file_type]
    if role == "attn_v":
        chosen = {
            "Q2_K": "Q4_K" if gqa >= 4 else "Q3_K",
            "Q2_K_S": "Q4_K" if gqa >= 4 else chosen,
            "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "IQ4_NL": "Q5_K" if gqa >= 4 else chosen,
            "IQ4_XS": "Q5_K" if gqa >= 4 else chosen,
            "Q4_K_M": "Q6_K" if use_more_bits(layer, n) else chosen,
            "Q5_K_M": "Q6_K" if use_more_bits(layer, n) else chosen,
            "Q4_K_S": "Q5_K" if layer < 4 else chosen,
        }.get(file_type, chosen)
        if shape.is_70b and chosen in ("Q3_K", "Q4_K"):
            chosen = "Q5_K"
    elif role == "ffn_down":
        chosen = {
            "Q2_K": "Q3_K",
            "Q2_K_S": "Q4_K" if layer < n // 8 else chosen,
            "Q3_K_M": "Q5_K" if layer < n // 16 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "Q4_K_M": "Q6_K" if use_more_bits(layer, n) else chosen,
            "IQ4_NL": "Q5_K" if layer < n // 8 else chosen,
            "IQ4_XS": "Q5_K" if layer < n // 8 else chosen,
            "Q5_K_M": "Q6_K" if use_more_bits(layer, n) else chosen,
            "Q4_K_S": "Q5_K" if layer < n // 8 else chosen,
        }.get(file_type, chosen)
    elif role == "attn_output":
        chosen = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(file_type, chosen)
    return chosen


def fallback(type_name: str, row_length: int) -> str:
    """llama.cpp's replacement for a type whose block does not divide the row (F16 as the last resort)."""
    if row_length % BLOCK_SIZES[type_name] == 0:
        return type_name
    replacement = FALLBACK.get(type_name, "F16")
    return replacement if replacement != "F16" and row_length % BLOCK_SIZES[replacement] == 0 else "F16"


def linear_type(file_type: str, linear: str, layer: int, in_features: int, shape: ModelShape) -> str:
    """The GGUF type llama.cpp stores block linear `linear` (e.g. ``mlp.down_proj``) of `layer` in, for
    file type `file_type` (``Q4_K_M``, ``Q3_K_S``, ``Q4_0``, ...; as in llama-quantize, ``Q3_K``,
    ``Q4_K`` and ``Q5_K`` name the ``_M`` mixes)."""
    if linear not in ROLES:
        raise ConfigError(f"no llama.cpp tensor role is known for '{linear}' (LLaMA-family block linears only)")
    return fallback(_mixed_type(check_file_type(file_type), ROLES[linear], layer, shape), in_features)
