"""Batches moved to the accelerator one step ahead, so host-to-GPU copies overlap compute.

When the calibration caches live in pinned host memory (a 70B model's inputs and targets are
2 x 4 GiB at 128 x 2048), every step needs its batch copied to the GPU. Copied on the compute
stream, the copy and the step take turns; here batch i+1 is copied on a side stream while the
step on batch i runs, and the compute stream waits for a batch only when it reaches it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, ...]


def _needs_copy(batch: Batch, device: torch.device) -> bool:
    return any(t.device != device for t in batch)


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Yield each batch on `device`. Host batches bound for a CUDA device are copied on a side
    stream one batch ahead (asynchronously when the host memory is pinned); batches already on
    the device, and every batch on other devices, are passed through or moved directly."""
    if device.type != "cuda":
        for batch in batches:
            yield tuple(t.to(device) for t in batch)
        return
    if device.index is None:  # "cuda" means the current device; tensors report "cuda:<index>"
        device = torch.device("cuda", torch.cuda.current_device())
    copy_stream: torch.cuda.Stream | None = None  # made on the first batch that needs copying

    def start_copy(batch: Batch | None) -> tuple[Batch | None, bool]:
        nonlocal copy_stream
        if batch is None or not _needs_copy(batch, device):
            return batch, False
        copy_stream = copy_stream or torch.cuda.Stream(device)
        copy_stream.wait_stream(torch.cuda.current_stream(device))  # don't overtake earlier work
        with torch.cuda.stream(copy_stream):
            return tuple(t.to(device, non_blocking=True) for t in batch), True

    iterator = iter(batches)
    pending, copied = start_copy(next(iterator, None))
    while pending is not None:
        if copied:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(copy_stream)  # the batch has arrived before the step reads it
            for tensor in pending:
                tensor.record_stream(compute)  # its memory is not reused while the step still reads it
        current = pending
        pending, copied = start_copy(next(iterator, None))  # overlaps the step on `current`
        yield current
