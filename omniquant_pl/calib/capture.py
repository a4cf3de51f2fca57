"""Capture the inputs of block 0 by running only the embedding part of the backbone.

The backbone's block list is swapped for recorders (one per block) that return their input
unchanged, so the model's own code builds embeddings, positions, rotary tables and the attention
masks (whatever the installed transformers does), and no transformer block runs. Each recorder keeps
the keyword arguments its block is called with: models that alternate layer types (Gemma 3's
sliding-window and full-attention layers) give each block its own mask and rotary table.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec

# Keyword arguments of a block call that only make sense for generation.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _BlockInputRecorder(nn.Module):
    def __init__(self, keep_hidden_states: bool) -> None:
        super().__init__()
        self.keep_hidden_states = keep_hidden_states  # block 0's only: the others see the same tensor
        self.hidden_states: list[torch.Tensor] = []
        self.block_kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("blocks called with extra positional arguments are not supported")
        if self.keep_hidden_states:
            self.hidden_states.append(hidden_states.detach())
        if self.block_kwargs is None:
            self.block_kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        return hidden_states


@dataclass
class BlockInputs:
    hidden_states: torch.Tensor  # (nsamples, seqlen, hidden)
    layer_kwargs: list[dict[str, Any]]  # per block: attention mask, position ids/embeddings (all samples)

    @property
    def block_kwargs(self) -> dict[str, Any]:
        """Block 0's keyword arguments."""
        return self.layer_kwargs[0]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor) -> BlockInputs:
    """Inputs of block 0 for each window, and every block's keyword arguments (one window per
    call, so kwargs are for batch 1 and broadcast over any batch size)."""
    backbone = model.get_submodule(spec.backbone)
    blocks = getattr(backbone, spec.layers)
    recorders = nn.ModuleList([_BlockInputRecorder(keep_hidden_states=index == 0) for index in range(len(blocks))])
    setattr(backbone, spec.layers, recorders)
    try:
        for window in windows:
            backbone(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        setattr(backbone, spec.layers, blocks)
    hidden = torch.cat(recorders[0].hidden_states)  # (nsamples, seqlen, hidden)
    return BlockInputs(hidden, [recorder.block_kwargs or {} for recorder in recorders])


def kwargs_to(block_kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None,
              moved: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Move the tensors of captured block kwargs (nested in tuples too) to a device, floating ones
    to `dtype` too when given; `moved` (by id of the original) shares one copy between blocks."""
    moved = {} if moved is None else moved

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in moved:
                moved[id(value)] = value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            return moved[id(value)]
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in block_kwargs.items()}


def run_block(block: nn.Module, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a transformers block and return its hidden states (older versions return tuples)."""
    out = block(hidden_states, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def linear_inputs(block: nn.Module, names: tuple[str, ...], record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call record(name, x) with every input x (tokens, in_features), detached in fp32, of each named
    linear of `block` while the context lasts (LET's ranges, lwc_search's mean squares)."""
    def make_hook(name: str):
        def hook(module, args):
            record(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))  # (tokens, in_features)

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
