"""QuantLinear: an nn.Linear whose weight is fake-quantized on the fly (inputs: see activation_hooks)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.lwc import WeightQuantizer


class QuantLinear(nn.Module):
    """Wraps the frozen weight/bias of an nn.Linear with a weight quantizer.

    The weight is quantized once per forward call (once per training step, whatever the batch).
    `to_linear()` bakes the fake-quantized weight into a plain nn.Linear: the fused module computes
    exactly what this one computes; given the linear's `QuantizedWeight` it holds exactly its
    dequantized codes. With an `input_rotation` R (quant.rotate_online) it quantizes W·R, and its
    input must arrive as x·R (the activation hook rotates it): the fused linear holds the codes of W·R.
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: WeightQuantizer | None,
                 input_rotation: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("input_rotation", input_rotation, persistent=False)  # (in, in) or None
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.weight_quantizer = weight_quantizer

    def rotated(self, weight: torch.Tensor) -> torch.Tensor:
        """W·R for an online input rotation R (computed in at least float32), else W."""
        if self.input_rotation is None:
            return weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        return (weight.to(compute) @ self.input_rotation.to(compute)).to(weight.dtype)  # (out, in) @ (in, in)

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.rotated(self.weight)
        return self.weight_quantizer(self.rotated(self.weight))

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The codes of `weight` (this linear's, or its LET-transformed value), rotated as it is used."""
        return self.weight_quantizer.quantize(self.rotated(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def original_linear(self) -> nn.Linear:
        """The wrapped nn.Linear again, on the same (untouched) weight and bias tensors."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    @torch.no_grad()
    def to_linear(self, quantized: QuantizedWeight | None = None) -> nn.Linear:
        """A plain nn.Linear holding the fake-quantized weight (no extra parameters): the
        quantizer's output, or `quantized.dequantize()` when the codes are given."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        value = self.quantized_weight() if quantized is None else quantized.dequantize(self.weight.dtype)
        linear.weight.copy_(value)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_block_linears(
    block: nn.Module,
    linear_names: Iterable[str],
    make_weight_quantizer: Callable[[str, nn.Linear], WeightQuantizer | None],
    input_rotations: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantLinear]:
    """Replace each named nn.Linear of `block` (in place) with a QuantLinear whose weight quantizer is
    `make_weight_quantizer(name, linear)` (and input rotation `input_rotations[name]`); returns them."""
    input_rotations = input_rotations or {}
    replaced: dict[str, QuantLinear] = {}
    for name in linear_names:
        linear = block.get_submodule(name)
        if isinstance(linear, QuantLinear):
            raise RuntimeError(f"{name} is already quantized")
        rotation = input_rotations.get(name)
        if rotation is not None:  # once, in the dtype `rotated` computes in
            rotation = rotation.to(linear.weight.device, torch.promote_types(linear.weight.dtype, torch.float32))
        quant_linear = QuantLinear(linear, make_weight_quantizer(name, linear), rotation)
        set_submodule(block, name, quant_linear)
        replaced[name] = quant_linear
    return replaced


def restore_block_linears(block: nn.Module, quantized: dict[str, QuantizedWeight] | None = None) -> list[str]:
    """Fuse every QuantLinear of `block` back into an nn.Linear with quantized weights (the
    dequantized codes of `quantized[name]` where given)."""
    quantized = quantized or {}
    names = [name for name, m in block.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_submodule(block, name, block.get_submodule(name).to_linear(quantized.get(name)))
    return names
