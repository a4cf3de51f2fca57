"""QuantExperts: a mixture of experts' 3-D expert tensors fake-quantized on the fly (QuantLinear's
counterpart for weights that are not nn.Linear modules).

A tensor (experts, out, in) is quantized as experts·out rows of `in` (per expert and output channel,
or group): one WeightQuantizer of shape (experts·out, in) per tensor, whose codes are saved under
the tensor's path. The experts module's own forward runs on the fake-quantized tensors
(torch.func.functional_call), so routing and the expert MLP stay transformers' code; the router is
not touched (it stays floating point).

Activation quantization of the experts' inputs (W4A4): within the experts module's forward, a
TorchFunctionMode quantizes the input of every F.linear call per token (gate_up's input and down's
input, for each expert), running the "eager" experts implementation (the one that calls F.linear).
"""
from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from omniquant_pl.arch.base import Experts
from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.lwc import WeightQuantizer

log = logging.getLogger(__name__)

# Attribute of an experts module holding its input quantizer and call counter (plain attributes:
# the module tree and state dict stay transformers')
INPUT_QUANTIZER_ATTR = "_omniquant_expert_input_quantizer"


def eager_forward(module: nn.Module) -> Callable:
    """The experts class's own forward (transformers' "eager" implementation, which calls F.linear
    per expert), unwrapped from the experts-implementation dispatch."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


class QuantExperts(nn.Module):
    """Wraps an experts module's 3-D tensors with one weight quantizer each (None: left FP).

    Its parameters keep the experts module's names (`gate_up_proj`, `down_proj`), so LET's
    transformed tensors reach it by the same paths. `to_experts()` gives the experts module back
    holding the dequantized codes.
    """

    def __init__(self, experts: nn.Module, names: tuple[str, ...],
                 quantizers: dict[str, WeightQuantizer | None]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            param = getattr(experts, name)
            param.requires_grad_(False)
            self.register_parameter(name, param)
        self.quantizers = nn.ModuleDict({name: q for name, q in quantizers.items() if q is not None})
        self.__dict__["original"] = experts  # not a submodule: its parameters are the ones above

    @property
    def num_experts(self) -> int:
        return getattr(self, self.names[0]).shape[0]

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.quantizers[name](getattr(self, name)) if name in self.quantizers else getattr(self, name)
                for name in self.names}

    def forward(self, *args, **kwargs):
        return functional_call(self.original, self.quantized_tensors(), args, kwargs)

    def quantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
        """The codes of each quantized tensor (`tensors[name]`, else its own value) as
        (experts·out, in) rows."""
        codes = {}
        for name, quantizer in self.quantizers.items():
            value = tensors.get(name, getattr(self, name))
            codes[name] = quantizer.quantize(value.reshape(-1, value.shape[-1]))  # (E·out, in)
        return codes

    def original_experts(self) -> nn.Module:
        """The wrapped experts module, on its untouched tensors."""
        return self.original

    @torch.no_grad()
    def to_experts(self, codes: dict[str, QuantizedWeight]) -> nn.Module:
        """The experts module holding the dequantized codes (tensors without codes: unchanged)."""
        for name, quantized in codes.items():
            old = getattr(self, name)
            value = quantized.dequantize(old.dtype).reshape(old.shape).to(old.device)  # (E, out, in)
            setattr(self.original, name, nn.Parameter(value, requires_grad=False))
        return self.original

    @torch.no_grad()
    def reset_experts(self, experts: list[int], initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back the initial clipping logits of the rows of `experts` (`initial[name]`: the
        quantizer's (upper, lower) logits at the start)."""
        for name, quantizer in self.quantizers.items():
            if quantizer.upper_logit is None:  # no LWC: no clipping to put back
                continue
            for logit, start in zip((quantizer.upper_logit, quantizer.lower_logit), initial[name]):
                per_expert = logit.view(self.num_experts, -1, 1)  # (E, rows per expert, 1)
                per_expert[experts] = start.view(self.num_experts, -1, 1)[experts].to(logit)


def quantize_block_experts(block: nn.Module, experts: Experts,
                           make_weight_quantizer: Callable[[tuple[int, int]], WeightQuantizer | None]) -> QuantExperts:
    """Replace the block's experts module (in place) with a QuantExperts; each 3-D tensor gets a
    quantizer for its (experts·out, in) rows."""
    module = block.get_submodule(experts.module)
    if isinstance(module, QuantExperts):
        raise RuntimeError(f"{experts.module} is already quantized")  # noqa: TRY004 - a state, not a type, error
    names = (experts.gate_up, experts.down)
    quantizers = {}
    for name in names:
        num, out_features, in_features = getattr(module, name).shape  # (E, out, in)
        quantizers[name] = make_weight_quantizer((num * out_features, in_features))
    quant = QuantExperts(module, names, quantizers)
    _set_submodule(block, experts.module, quant)
    return quant


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def restore_block_experts(block: nn.Module, experts: Experts, codes: dict[str, QuantizedWeight] | None) -> None:
    """Put the experts module back: holding the dequantized codes (`codes` by tensor path), or
    untouched (None: abandoning)."""
    module = block.get_submodule(experts.module)
    if not isinstance(module, QuantExperts):
        return
    if codes is None:
        original = module.original_experts()
    else:
        original = module.to_experts({name: codes[f"{experts.module}.{name}"] for name in module.quantizers})
    _set_submodule(block, experts.module, original)


# -- activation quantization -------------------------------------------------------------------
class _QuantizedLinearInputs(TorchFunctionMode):
    """Quantizes the input of every F.linear call made while it is active (one experts forward)."""

    def __init__(self, quantizer: nn.Module, counter) -> None:
        super().__init__()
        self.quantizer, self.counter = quantizer, counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.linear:
            x = args[0] if args else kwargs.pop("input")
            args = (self.quantizer(x), *args[1:])  # (tokens of one expert, in): per token
            if not torch.compiler.is_compiling():
                self.counter.expert_linear_calls += 1
        return func(*args, **kwargs)


def _forward_quantizing_inputs(self: nn.Module, *args, **kwargs):
    """The experts' eager forward with every F.linear input quantized (bound to the experts module
    as its instance `forward`)."""
    quantizer, counter = self.__dict__[INPUT_QUANTIZER_ATTR]
    with _QuantizedLinearInputs(quantizer, counter):
        return eager_forward(self)(self, *args, **kwargs)


def install_input_quantizer(block: nn.Module, experts: Experts, quantizer: nn.Module, counter) -> nn.Module:
    """Quantize the inputs of every expert's linears in `block` (the experts module, or the one a
    QuantExperts wraps); `counter.expert_linear_calls` counts them. Returns the module hooked."""
    module = block.get_submodule(experts.module)
    module = module.original if isinstance(module, QuantExperts) else module
    module.__dict__[INPUT_QUANTIZER_ATTR] = (quantizer, counter)
    module.forward = types.MethodType(_forward_quantizing_inputs, module)
    return module


def remove_input_quantizer(module: nn.Module) -> None:
    module.__dict__.pop(INPUT_QUANTIZER_ATTR, None)
    module.__dict__.pop("forward", None)


# -- routing statistics ------------------------------------------------------------------------
@contextlib.contextmanager
def expert_token_counts(block: nn.Module, experts: Experts | None) -> Iterator[list[int]]:
    """Tokens routed to each expert (over every forward of `block` inside the context; a token
    counts once per expert of its top-k). Empty without experts."""
    counts: list[int] = []
    if experts is None:
        yield counts
        return
    module = block.get_submodule(experts.module)
    total = torch.zeros(getattr(module, experts.gate_up).shape[0], dtype=torch.long)

    def hook(module, args, kwargs):
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (tokens, top_k)
        total.add_(torch.bincount(top_k_index.reshape(-1).cpu(), minlength=total.numel())[: total.numel()])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()
        counts.extend(total.tolist())
