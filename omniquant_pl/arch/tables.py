"""The adapter tables of the supported families. Adding a family is one entry here."""
from __future__ import annotations

from omniquant_pl.arch.base import ArchSpec, LinearGroup, NormGroup

# Llama 1/2/3, Mistral, Qwen2/3 and SmolLM2 share this block: RMSNorm, q/k/v/o, gated MLP.
LLAMA_LIKE = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    backbone="model",
    layers="layers",
    attention="self_attn",
    qkv=NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    fc1=NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    out=LinearGroup("self_attn.v_proj", "self_attn.o_proj"),
    fc2=("mlp.down_proj",),
)

# OPT: LayerNorm with bias, fc1/fc2 with ReLU, learned positions (added before the blocks).
OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    backbone="model.decoder",
    layers="layers",
    attention="self_attn",
    qkv=NormGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    fc1=NormGroup("final_layer_norm", ("fc1",)),
    out=LinearGroup("self_attn.v_proj", "self_attn.out_proj"),
    fc2=("fc2",),
    norm_has_bias=True,
)

BUILTIN_ARCHS = (LLAMA_LIKE, OPT)
