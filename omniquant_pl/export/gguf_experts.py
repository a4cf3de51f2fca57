"""A mixture of experts' tensors the way llama.cpp stores them: three stacks per block.

transformers holds a block's experts as two 3-D tensors, ``gate_up_proj`` (experts, 2·intermediate,
hidden; gate rows then up rows) and ``down_proj`` (experts, hidden, intermediate), and saves them
per expert under the checkpoint's own names (Mixtral ``block_sparse_moe.experts.<e>.w1/w3/w2``,
Qwen3-MoE ``mlp.experts.<e>.gate_proj/up_proj/down_proj``). llama.cpp reads ``ffn_gate_exps``,
``ffn_up_exps`` and ``ffn_down_exps``, each (experts, rows, in), plus the router ``ffn_gate_inp``
(kept in F32, as llama.cpp's quantizer keeps it). A run's expert codes are (experts·rows, in)
rows, so each stack is a row selection of them (`split_gate_up`), packed like any linear and
written 3-D. Stacks travel under the names the `gguf` package maps to those tensors
(``<block>.<experts module>.gate_proj.weight``, ...).
"""
from __future__ import annotations

import re

import torch

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.quant.codes import QuantizedWeight

STACKS = ("gate", "up", "down")
# the names transformers saves one expert's tensors under -> the stack they belong to
PER_EXPERT_ROLES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
PER_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


def expert_count(config) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def stack_key(block_prefix: str, module: str, stack: str) -> str:
    """The name a stack travels under (``model.layers.3.mlp.experts.gate_proj.weight``)."""
    return f"{block_prefix}{module}.{stack}_proj.weight"


def split_gate_up(value, experts: int) -> tuple:
    """(gate, up) of a fused gate|up: a (experts·2·rows, in) QuantizedWeight or float rows, or a float
    (experts, 2·rows, in) tensor; each comes back in the same form with half the rows."""
    def half(index: int):
        def select(rows: torch.Tensor) -> torch.Tensor:
            per_expert = rows.reshape(experts, 2, -1, *rows.shape[1:])  # (experts, gate|up, rows, ...)
            return per_expert[:, index].reshape(-1, *rows.shape[1:])
        return select

    if isinstance(value, QuantizedWeight):
        return value.map_rows(half(0)), value.map_rows(half(1))
    gate, up = value.chunk(2, dim=1)  # (experts, rows, in) each
    return gate, up


def float_stacks(state: dict[str, torch.Tensor], config, block_prefixes: list[str], module: str, gate_up: str,
                 down: str) -> dict[str, torch.Tensor]:
    """A float model's state dict with each block's fused 3-D expert tensors replaced by the stacks."""
    out = dict(state)
    experts = expert_count(config)
    for prefix in block_prefixes:
        fused, down_key = f"{prefix}{module}.{gate_up}", f"{prefix}{module}.{down}"
        if fused not in out:
            continue
        gate, up = split_gate_up(out.pop(fused), experts)
        out[stack_key(prefix, module, "gate")], out[stack_key(prefix, module, "up")] = gate, up
        out[stack_key(prefix, module, "down")] = out.pop(down_key)
    return out


def add_experts(writer, config) -> None:
    """The expert keys: counts, and Qwen3-MoE's expert intermediate size; a one-line refusal where
    llama.cpp would route differently."""
    experts = expert_count(config)
    if not experts:
        return
    if config.model_type == "qwen3_moe" and not getattr(config, "norm_topk_prob", True):
        raise OmniQuantError("llama.cpp's Qwen3-MoE renormalizes the chosen experts' weights; this model does not "
                             "(norm_topk_prob false): export it with its fake-quantized model instead")
    writer.add_expert_count(experts)
    writer.add_expert_used_count(int(config.num_experts_per_tok))
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
