"""Calibration caches: every window's hidden states at a block boundary, on the plan's cache device.

A block's targets are the FP block's outputs on the FP chain's inputs; its training inputs are the
quantized chain's. `propagate` runs one block over a whole cache in batches.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omniquant_pl.calib.capture import run_block
from omniquant_pl.calib.prefetch import on_device


def new_cache(shape: torch.Size, dtype: torch.dtype, device: torch.device, blocks_device: torch.device) -> torch.Tensor:
    """An empty cache (pinned when it is on the host and the blocks run on a GPU, so batch copies
    are asynchronous)."""
    pin = device.type == "cpu" and blocks_device.type == "cuda"
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


def cache_of(hidden: torch.Tensor, dtype: torch.dtype, device: torch.device, blocks_device: torch.device) -> torch.Tensor:
    """`hidden` (N, T, hidden) as a cache of `dtype` on `device`."""
    cache = new_cache(hidden.shape, dtype, device, blocks_device)
    cache.copy_(hidden)
    return cache


@torch.no_grad()
def propagate(block: nn.Module, inputs: torch.Tensor, block_kwargs: dict[str, Any], blocks_device: torch.device,
              batch_size: int, amp: torch.dtype | None) -> torch.Tensor:
    """The block's outputs for every cached input, in batches of at least 4, under autocast `amp`;
    a new cache beside `inputs`."""
    outputs = new_cache(inputs.shape, inputs.dtype, inputs.device, blocks_device)
    step = max(batch_size, 4)
    starts = range(0, inputs.shape[0], step)
    batches = on_device(((inputs[start : start + step],) for start in starts), blocks_device)
    for start, (batch,) in zip(starts, batches):
        with torch.autocast(blocks_device.type, dtype=amp, enabled=amp is not None):
            out = run_block(block, batch, block_kwargs)
        outputs[start : start + step].copy_(out, non_blocking=True)
    if outputs.device != blocks_device and blocks_device.type == "cuda":
        torch.cuda.synchronize()  # the host-side cache is complete before anyone reads it
    return outputs
