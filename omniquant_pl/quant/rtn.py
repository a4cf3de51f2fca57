"""Round-to-nearest (RTN) baseline: the same grid as OmniQuant with no learned clipping."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.registry import check_supported, get_blocks, warn_if_weight_only
from omniquant_pl.config import QuantConfig
from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.activation_hooks import activation_quantization, use_quantized_attention
from omniquant_pl.quant.gguf_mix import ModelShape
from omniquant_pl.quant.grids import LinearGrid, build_quantizer, linear_grid, run_grid
from omniquant_pl.quant.lwc import WeightQuantizer
from omniquant_pl.rotate import online_rotations, rotate_weight


def rtn_quantizer(weight: torch.Tensor, quant: QuantConfig, grid: LinearGrid | None = None) -> WeightQuantizer:
    """Round-to-nearest on the run's grid, or on `grid` (one linear's, for runs with quant.gguf_type)."""
    return build_quantizer(grid or run_grid(quant), tuple(weight.shape))


def check_quantizable(spec: ArchSpec, blocks: nn.ModuleList, quant: QuantConfig) -> None:
    """Before any work: the spec supports what `quant` asks (one warning for a weight-only spec), it
    names every linear of a block, and a quantizer can be built for each of them."""
    check_supported(spec, quant.let, quant.abits)
    warn_if_weight_only(spec, len(blocks))
    spec.check_block(blocks[0])
    if quant.gguf_type is None:
        for name in spec.linear_names:
            rtn_quantizer(blocks[0].get_submodule(name).weight, quant)


@contextlib.contextmanager
def rtn_weights(model: nn.Module, spec: ArchSpec, quant: QuantConfig) -> Iterator[nn.Module]:
    """Temporarily replace every block linear's weight by its RTN fake-quantized value."""
    with rtn_block_weights(list(get_blocks(model, spec)), spec, quant, ModelShape.of(model.config)):
        yield model


@contextlib.contextmanager
@torch.no_grad()
def rtn_block_weights(blocks: list[nn.Module], spec: ArchSpec, quant: QuantConfig,
                      shape: ModelShape | None = None, rotations: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Temporarily replace the linears' weights of `blocks` (the model's blocks in order, or any blocks of
    a run without quant.gguf_type) by their RTN fake-quantized values (of W·R where `rotations` names
    the online rotation R of a linear's input: its input must then arrive rotated)."""
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    rotations = rotations or {}
    for index, block in enumerate(blocks):
        for name in spec.linear_names:
            weight = block.get_submodule(name).weight
            originals.append((weight, weight.detach().to("cpu", copy=True)))
            grid = linear_grid(quant, name, index, weight.shape[1], shape)
            rotation = rotations.get(name)
            value = weight if rotation is None else rotate_weight(weight, right=rotation.to(weight.device))
            weight.copy_(rtn_quantizer(value, quant, grid)(value))
    try:
        yield
    finally:
        for weight, original in originals:
            weight.copy_(original)


@contextlib.contextmanager
def rtn_model(model: nn.Module, spec: ArchSpec, quant: QuantConfig) -> Iterator[nn.Module]:
    """The RTN baseline of `quant` for the context's duration: RTN weights and, below 16 bits,
    per-token activation quantization (linear inputs and attention q/k/v), with the online rotations
    of quant.rotate_online."""
    check_supported(spec, let=False, abits=quant.abits)  # RTN has no LET
    blocks = list(get_blocks(model, spec))
    rotations = online_rotations(spec, quant.rotate, quant.rotate_seed, quant.rotate_online, blocks[0])
    with rtn_block_weights(blocks, spec, quant, ModelShape.of(model.config), rotations), contextlib.ExitStack() as stack:
        if quant.abits < 16:
            use_quantized_attention(model)
            stack.enter_context(activation_quantization(blocks, spec, quant.abits, rotations))
        yield model


@contextlib.contextmanager
def rtn_block(block: nn.Module, spec: ArchSpec, quant: QuantConfig) -> Iterator[nn.Module]:
    """One block as the RTN baseline of `quant` runs it (a streamed evaluation, block by block):
    RTN weights and, below 16 bits, per-token activation quantization. The model's attention must
    already be routed (use_quantized_attention) when abits < 16."""
    if quant.gguf_type is not None:
        raise ConfigError("the RTN baseline of a GGUF file type (quant.gguf_type) needs the whole model in memory; "
                          "evaluate it without streaming, or use llama.cpp's own quantizer as the baseline")
    with rtn_block_weights([block], spec, quant), contextlib.ExitStack() as stack:
        if quant.abits < 16:
            stack.enter_context(activation_quantization([block], spec, quant.abits))
        yield block
