"""The adapter tables of the supported families. Adding a family is one entry here."""
from __future__ import annotations

import dataclasses

from omniquant_pl.arch.base import ArchSpec, ConfigVariant, Experts, FusedRows, LinearGroup, NormGroup

# Llama 1/2/3, Mistral, Qwen2/3 and SmolLM2 share this block: RMSNorm, q/k/v/o, gated MLP.
LLAMA_LIKE = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    backbone="model",
    layers="layers",
    attention="self_attn",
    qkv=NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    fc1=NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    out=LinearGroup("self_attn.v_proj", "self_attn.o_proj"),
    fc2=("mlp.down_proj",),
    up_down=LinearGroup("mlp.up_proj", "mlp.down_proj"),
)

# Qwen3 normalises q and k per head after the projection, which undoes a q/k scale.
QWEN3 = dataclasses.replace(LLAMA_LIKE, name="qwen3", model_types=("qwen3",), let_qk=False)

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
    rotary_pairs=None,
    let_shifts=True,
)

# Phi-3 (and Phi-4-mini, partial rotary): the Llama block with q|k|v fused in qkv_proj and gate|up in
# gate_up_proj (Phi3MLP: gate, up = chunk(2); down(up · act(gate))).
PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    backbone="model",
    layers="layers",
    attention="self_attn",
    qkv=NormGroup("input_layernorm", ("self_attn.qkv_proj",)),
    fc1=NormGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    out=LinearGroup("self_attn.qkv_proj", "self_attn.o_proj", source_rows="v"),
    fc2=("mlp.down_proj",),
    up_down=LinearGroup("mlp.gate_up_proj", "mlp.down_proj", source_rows="up"),
    fused=(
        FusedRows("self_attn.qkv_proj", (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads"))),
        FusedRows("mlp.gate_up_proj", (("gate", "share"), ("up", "share"))),
    ),
)

# Falcon: LayerNorms, q|k|v fused per kv head in query_key_value ((kv_heads, groups + 2, head_dim):
# the 40B/180B new_decoder_architecture layout; 7B's multi-query q..q|k|v is it with 1 kv head, and
# the RW models' per-head q|k|v with kv_heads = heads), a GELU MLP, rotate_half RoPE, and q/k/v
# quantized inside the torch SDPA call of its "sdpa" path: transformers <= 5.24 makes that call in
# Falcon's own forward, 5.25 in the sdpa function of its attention interface (k/v repeated per query
# head or passed with enable_gqa: the same per-token, per-head values). The entry is 7B's block:
# attention and MLP in parallel on one shared input_layernorm (its scale folds into both).
FALCON = ArchSpec(
    name="falcon",
    model_types=("falcon",),
    backbone="transformer",
    layers="h",
    attention="self_attention",
    qkv=NormGroup("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),
    out=LinearGroup("self_attention.query_key_value", "self_attention.dense", source_rows="v"),
    fc2=("mlp.dense_4h_to_h",),
    norm_has_bias=True,
    fused=(FusedRows("self_attention.query_key_value", (("q", "group"), ("k", "head"), ("v", "head")),
                     repeat="kv_heads"),),
    attention_hook="sdpa",
    variants=(
        # 40B/180B: parallel, ln_attn -> query_key_value and ln_mlp -> dense_h_to_4h (transformers
        # sets num_ln_in_parallel_attn None to 2 when it builds the model; 11B's 1 keeps one norm)
        ConfigVariant(when=(("parallel_attn", (True,)), ("new_decoder_architecture", (True,)),
                            ("num_ln_in_parallel_attn", (None, 2))),
                      changes=(("qkv", NormGroup("ln_attn", ("self_attention.query_key_value",))),
                               ("fc1", NormGroup("ln_mlp", ("mlp.dense_h_to_4h",))))),
        # RW-1B/7B: attention, then the MLP on post_attention_layernorm of the residual
        ConfigVariant(when=(("parallel_attn", (False,)),),
                      changes=(("qkv", NormGroup("input_layernorm", ("self_attention.query_key_value",))),
                               ("fc1", NormGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",))))),
        ConfigVariant(when=(("alibi", (True,)),), changes=(("rotary_pairs", None),)),  # ALiBi: no rotary
        # linear biases (RW): norm and v shifts fold into them, as OPT's
        ConfigVariant(when=(("bias", (True,)),), changes=(("let_shifts", True),)),
    ),
)

# Mixtral: the Llama attention, then a sparse MoE MLP (mlp.gate: a top-k router; mlp.experts: every
# expert's gate|up and down as 3-D tensors). post_attention_layernorm feeds the router and every
# expert's gate_up: its LET scale folds into all of them (routing unchanged); the router stays FP.
# No up_down scale (one per expert is not implemented).
_MOE_EXPERTS = Experts(module="mlp.experts", router="mlp.gate")
MIXTRAL = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    backbone="model",
    layers="layers",
    attention="self_attn",
    qkv=NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    fc1=NormGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts.gate_up_proj")),
    out=LinearGroup("self_attn.v_proj", "self_attn.o_proj"),
    fc2=("mlp.experts.down_proj",),
    experts=_MOE_EXPERTS,
)

# Qwen3-MoE: Mixtral's layout with Qwen3's per-head q/k norms (no q/k scale). Models whose config
# makes some blocks dense (mlp_only_layers, decoder_sparse_step > 1) are refused by check_block.
QWEN3_MOE = dataclasses.replace(MIXTRAL, name="qwen3_moe", model_types=("qwen3_moe",), let_qk=False)

# Gemma 3 (text): RMSNorms that multiply by (1 + w); four per block: input_layernorm -> q/k/v,
# post_attention_layernorm on o_proj's output (before the residual add: v->o stays exact),
# pre_feedforward_layernorm -> gate/up, post_feedforward_layernorm on down_proj's output; a GELU-tanh
# gated MLP; per-head q/k norms (no q/k scale, as Qwen3). Sliding-window and full layers alternate
# (config.layer_types): each block gets its own mask and rotary table (calib/capture.py keeps them per
# block). Embeddings are scaled by sqrt(hidden) inside embed_tokens, before block 0's captured input.
GEMMA3 = dataclasses.replace(
    LLAMA_LIKE, name="gemma3", model_types=("gemma3_text",), let_qk=False, norm_weight_offset=1.0,
    fc1=NormGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)

BUILTIN_ARCHS = (LLAMA_LIKE, QWEN3, OPT, PHI3, FALCON, MIXTRAL, QWEN3_MOE, GEMMA3)
