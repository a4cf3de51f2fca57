"""Activation quantization without copying model code.

- Linear inputs: a forward pre-hook quantizes the input per token (the module stays nn.Linear).
- q/k/v of the attention matmuls (after rotary embeddings; k/v are what a KV cache would hold):
  an attention function registered through transformers' public AttentionInterface quantizes
  them per token and head, then calls the SDPA implementation. Softmax probabilities stay in
  full precision. Modules without a registered quantizer pass through unchanged. SDPA's mask
  function is registered under the same name (AttentionMaskInterface), so transformers builds
  the padding and sliding-window masks it builds for SDPA; without it, attention is plain causal.
- Eager calls of the q/k/v quantizers are counted, so a block whose attention bypassed the
  function (the model was never routed) fails loudly instead of training with full-precision q/k/v.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.errors import AttentionNotQuantizedError
from omniquant_pl.quant.act import PerTokenActQuantizer

log = logging.getLogger(__name__)

ATTENTION_NAME = "omniquant_sdpa"
# Attribute of an attention module holding its q/k/v quantizer (a plain attribute, not a
# submodule: state dicts and module trees stay those of transformers, and torch.compile guards
# stay per module instead of on a global registry).
QKV_QUANTIZER_ATTR = "_omniquant_qkv_quantizer"
# Attribute of an attention module holding the BlockActivationQuantizers that count its q/k/v
# quantizer's eager calls (touched only outside torch.compile: no guards, no recompiles).
QKV_CALL_COUNTER_ATTR = "_omniquant_qkv_call_counter"
_registered = False


def _quantized_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    quantizer = module.__dict__.get(QKV_QUANTIZER_ATTR)
    if quantizer is not None:  # (B, heads, T, head_dim): per token and head
        query, key, value = quantizer(query), quantizer(key), quantizer(value)
        if not torch.compiler.is_compiling():
            module.__dict__[QKV_CALL_COUNTER_ATTR].qkv_calls += 1
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register_quantized_attention() -> None:
    """Register the attention function and, under the same name, the mask function of the SDPA
    it calls: transformers builds masks only for names its mask registry knows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _quantized_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through `_quantized_attention` (same math and masks as SDPA)."""
    global _registered
    if not _registered:
        _register_quantized_attention()
        _registered = True
    if model.config._attn_implementation != ATTENTION_NAME:
        log.info("attention: %s -> %s (q/k/v activation quantization)", model.config._attn_implementation, ATTENTION_NAME)
        model.set_attn_implementation(ATTENTION_NAME)


def _input_quant_hook(quantizer: PerTokenActQuantizer):
    def hook(module, args):
        return (quantizer(args[0]), *args[1:])

    return hook


class BlockActivationQuantizers:
    """Installs (and removes) per-token input quantizers on a block's linears and attention."""

    def __init__(self, block: nn.Module, spec: ArchSpec, bits: int, linears: bool = True) -> None:
        self.quantizer = PerTokenActQuantizer(bits)
        self.handles = []
        if linears:
            for name in spec.linear_names:
                self.handles.append(block.get_submodule(name).register_forward_pre_hook(_input_quant_hook(self.quantizer)))
        self.attention = block.get_submodule(spec.attention)
        self.attention.__dict__[QKV_QUANTIZER_ATTR] = self.quantizer
        self.attention.__dict__[QKV_CALL_COUNTER_ATTR] = self
        self.qkv_calls = 0  # eager calls of the q/k/v quantizer (compiled calls are not counted)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.attention.__dict__.pop(QKV_QUANTIZER_ATTR, None)
        self.attention.__dict__.pop(QKV_CALL_COUNTER_ATTR, None)

    @contextlib.contextmanager
    def expect_qkv_quantized(self, what: str) -> Iterator[None]:
        """Raise AttentionNotQuantizedError if an eager forward inside the context did not run the
        q/k/v quantizer (the model's attention is not routed through `_quantized_attention`)."""
        calls_before = self.qkv_calls
        yield
        if self.qkv_calls == calls_before:
            config = getattr(self.attention, "config", None)
            routed_to = getattr(config, "_attn_implementation", "unknown")
            raise AttentionNotQuantizedError(
                f"{what}: {self.quantizer.grid.bits}-bit activations, but q/k/v were not quantized: the model's "
                f"attention runs '{routed_to}', not '{ATTENTION_NAME}'; call "
                "omniquant_pl.arch.attention_hooks.use_quantized_attention(model) before building blocks "
                "(models whose attention bypasses transformers' AttentionInterface need abits 16)"
            )


@contextlib.contextmanager
def activation_quantization(blocks: list[nn.Module], spec: ArchSpec, bits: int) -> Iterator[None]:
    """Quantize activations of every given block for the duration of the context."""
    installed = [BlockActivationQuantizers(block, spec, bits) for block in blocks]
    try:
        yield
    finally:
        for quantizers in installed:
            quantizers.remove()
