"""Capture the inputs of block 0 by running only the embedding part of the backbone.

The backbone's block list is swapped for a single recorder that returns its input unchanged, so
the model's own code builds embeddings, positions, rotary tables and the attention mask (whatever
the installed transformers does), and no transformer block runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec

# Keyword arguments of a block call that only make sense for generation.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _BlockInputRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden_states: list[torch.Tensor] = []
        self.block_kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("blocks called with extra positional arguments are not supported")
        self.hidden_states.append(hidden_states.detach())
        if self.block_kwargs is None:
            self.block_kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        return hidden_states


@dataclass
class BlockInputs:
    hidden_states: torch.Tensor  # (nsamples, seqlen, hidden)
    block_kwargs: dict[str, Any]  # attention mask, position ids/embeddings, shared by all samples


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor) -> BlockInputs:
    """Inputs of block 0 for each window (one window per call, so kwargs are for batch 1 and
    broadcast over any batch size)."""
    backbone = model.get_submodule(spec.backbone)
    blocks = getattr(backbone, spec.layers)
    recorder = _BlockInputRecorder()
    setattr(backbone, spec.layers, nn.ModuleList([recorder]))
    try:
        for window in windows:
            backbone(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        setattr(backbone, spec.layers, blocks)
    hidden = torch.cat(recorder.hidden_states)  # (nsamples, seqlen, hidden)
    return BlockInputs(hidden, recorder.block_kwargs or {})


def kwargs_to(block_kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move the tensors of captured block kwargs (nested in tuples too) to a device, floating ones
    to `dtype` too when given."""

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in block_kwargs.items()}


def run_block(block: nn.Module, hidden_states: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a transformers block and return its hidden states (older versions return tuples)."""
    out = block(hidden_states, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out
