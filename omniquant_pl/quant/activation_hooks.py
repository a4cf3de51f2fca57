"""Activation quantization without copying model code.

- Linear inputs: a forward pre-hook quantizes the input per token (the module stays nn.Linear).
- q/k/v of the attention matmuls (after rotary embeddings; k/v are what a KV cache would hold):
  an attention function registered through transformers' public AttentionInterface quantizes
  them per token and head, then calls the SDPA implementation. Softmax probabilities stay in
  full precision. Modules without a registered quantizer pass through unchanged. SDPA's mask
  function is registered under the same name (AttentionMaskInterface), so transformers builds
  the padding and sliding-window masks it builds for SDPA; without it, attention is plain causal.
- Models whose "sdpa" attention path reaches torch's scaled_dot_product_attention in a way the
  registry cannot route (Falcon, the spec's attention_hook "sdpa": its own forward calls it up to
  transformers 5.24; from 5.25 its sdpa function does, after repeating multi-query/grouped k/v or
  with enable_gqa) keep their own attention and masks: within the attention module's forward only, a
  TorchFunctionMode quantizes q/k/v of that call (no global patching). The quantizer works per token
  and head, so repeated k/v heads get the values their kv head gets. The model must run its "sdpa"
  path; use_quantized_attention refuses any other.
- A mixture of experts' 3-D expert tensors (spec.experts): every expert's gate_up and down inputs
  are quantized per token inside the experts module's forward (quant/experts.py); the router's
  input is not (it stays floating point).
- Eager calls of the q/k/v quantizers are counted, so a block whose attention bypassed the
  function (the model was never routed) fails loudly instead of training with full-precision q/k/v.
"""
from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.errors import AttentionNotQuantizedError
from omniquant_pl.quant.act import PerTokenActQuantizer
from omniquant_pl.quant.experts import install_input_quantizer, remove_input_quantizer

log = logging.getLogger(__name__)

ATTENTION_NAME = "omniquant_sdpa"
# Attribute of an attention module holding its q/k/v quantizer (a plain attribute, not a
# submodule: state dicts and module trees stay those of transformers, and torch.compile guards
# stay per module instead of on a global registry).
QKV_QUANTIZER_ATTR = "_omniquant_qkv_quantizer"
# Attribute of an attention module holding the BlockActivationQuantizers that count its q/k/v
# quantizer's eager calls (touched only outside torch.compile: no guards, no recompiles).
QKV_CALL_COUNTER_ATTR = "_omniquant_qkv_call_counter"


def _quantize_qkv(module: nn.Module, query, key, value):
    """q/k/v through the module's quantizer (counted), or unchanged where it has none."""
    quantizer = module.__dict__.get(QKV_QUANTIZER_ATTR)
    if quantizer is None:
        return query, key, value
    if not torch.compiler.is_compiling():
        module.__dict__[QKV_CALL_COUNTER_ATTR].qkv_calls += 1
    return quantizer(query), quantizer(key), quantizer(value)  # (B, heads, T, head_dim): per token and head


def _quantized_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    query, key, value = _quantize_qkv(module, query, key, value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


class _QuantizedSDPA(TorchFunctionMode):
    """Quantizes q/k/v of every torch scaled_dot_product_attention call made while it is active
    (within one attention module's forward); every other call passes through unchanged."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            qkv = [*args[:3], *(kwargs.pop(name) for name in names[len(args):])]  # positional or by name
            args = (*_quantize_qkv(self.module, *qkv), *args[3:])
        return func(*args, **kwargs)


def _forward_quantizing_sdpa(self: nn.Module, *args, **kwargs):
    """The module's class forward, with its SDPA call's q/k/v quantized (bound to the module as
    its instance `forward` by BlockActivationQuantizers)."""
    with _QuantizedSDPA(self):
        return type(self).forward(self, *args, **kwargs)


def _register_quantized_attention() -> None:
    """Register the attention function and, under the same name, the mask function of the SDPA
    it calls: transformers builds masks only for names its mask registry knows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _quantized_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through `_quantized_attention` (same math and masks as SDPA).
    A model that calls SDPA itself (attention_hook "sdpa") keeps its attention, which must be its
    "sdpa" path (BlockActivationQuantizers wraps that call)."""
    from omniquant_pl.arch.registry import get_arch

    if get_arch(model).attention_hook == "sdpa":
        running = model.config._attn_implementation
        if running != "sdpa":
            raise AttentionNotQuantizedError(
                f"activation quantization of a {model.config.model_type} model quantizes q/k/v in its torch SDPA "
                f"call, but its attention runs '{running}' (transformers cannot switch it after loading); load it "
                "with --model.attn_implementation sdpa"
            )
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:  # registered once per process, in transformers' registry
        _register_quantized_attention()
    if model.config._attn_implementation != ATTENTION_NAME:
        log.info("attention: %s -> %s (q/k/v activation quantization)", model.config._attn_implementation, ATTENTION_NAME)
        model.set_attn_implementation(ATTENTION_NAME)


def _input_quant_hook(quantizer: PerTokenActQuantizer, rotation: torch.Tensor | None = None,
                      casts: dict | None = None):
    """Quantize a linear's input per token; with an online `rotation` R (in, in), quantize x·R (the
    linear's weight holds W·R: rotate.py). `casts` holds R in each (dtype, device) inputs came in,
    shared by the hooks of one block (the readers of a norm share R)."""
    if rotation is None:
        return lambda module, args: (quantizer(args[0]), *args[1:])
    casts = {} if casts is None else casts

    def hook(module, args):
        x = args[0]
        key = (id(rotation), x.dtype, x.device)
        if key not in casts:
            casts[key] = rotation.to(dtype=x.dtype, device=x.device)
        return (quantizer(x @ casts[key]), *args[1:])  # (..., in) @ (in, in)

    return hook


class BlockActivationQuantizers:
    """Installs (and removes) per-token input quantizers on a block's linears and attention."""

    def __init__(self, block: nn.Module, spec: ArchSpec, bits: int, linears: bool = True,
                 rotations: dict[str, torch.Tensor] | None = None) -> None:
        """`rotations`: linear name -> the online rotation of its input (quant.rotate_online)."""
        self.quantizer = PerTokenActQuantizer(bits)
        self.handles = []
        rotations, casts = rotations or {}, {}
        if linears:
            for name in spec.linear_names:
                hook = _input_quant_hook(self.quantizer, rotations.get(name), casts)
                self.handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
        self.attention = block.get_submodule(spec.attention)
        self.attention.__dict__[QKV_QUANTIZER_ATTR] = self.quantizer
        self.attention.__dict__[QKV_CALL_COUNTER_ATTR] = self
        self.routed_name = ATTENTION_NAME if spec.attention_hook == "registry" else "sdpa"
        if spec.attention_hook == "sdpa":  # an instance attribute: the class and state dict stay transformers'
            self.attention.forward = types.MethodType(_forward_quantizing_sdpa, self.attention)
        self.qkv_calls = 0  # eager calls of the q/k/v quantizer (compiled calls are not counted)
        self.expert_linear_calls = 0  # eager F.linear calls of the experts with their input quantized
        self.experts = None
        if spec.experts is not None and linears:
            self.experts = install_input_quantizer(block, spec.experts, self.quantizer, self)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.attention.__dict__.pop(QKV_QUANTIZER_ATTR, None)
        self.attention.__dict__.pop(QKV_CALL_COUNTER_ATTR, None)
        self.attention.__dict__.pop("forward", None)
        if self.experts is not None:
            remove_input_quantizer(self.experts)
            self.experts = None

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
                f"attention runs '{routed_to}', not '{self.routed_name}'; call "
                "omniquant_pl.quant.activation_hooks.use_quantized_attention(model) before building blocks "
                "(models whose attention bypasses transformers' AttentionInterface need abits 16)"
            )


@contextlib.contextmanager
def activation_quantization(blocks: list[nn.Module], spec: ArchSpec, bits: int,
                            rotations: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Quantize activations of every given block for the duration of the context (with the online
    `rotations`, by linear name, of a run with quant.rotate_online)."""
    installed = [BlockActivationQuantizers(block, spec, bits, rotations=rotations) for block in blocks]
    try:
        yield
    finally:
        for quantizers in installed:
            quantizers.remove()
