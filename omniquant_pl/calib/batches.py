"""Batches of a block's calibration caches: views sliced from the caches, in a seeded order.

`cached_batch_loader` gives what a block's Trainer iterates: (quantized inputs, targets[, aug
targets]) per batch, or chunks of consecutive batches (train.steps_per_call), in an order that
depends on (seed, epoch) alone.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class CachedBatches(Dataset):
    """Batches of (quantized inputs, targets[, aug targets]) sliced from caches (views, no copy).
    A list of indices gives a chunk: the list of those batches."""

    def __init__(self, *caches: torch.Tensor, batch_size: int) -> None:
        self.caches = caches
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.caches[0].shape[0] // self.batch_size)

    def __getitem__(self, index: int | list[int]) -> tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]]:
        if isinstance(index, list):
            return [self[i] for i in index]
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return tuple(cache[rows] for cache in self.caches)  # each (B, seqlen, hidden)


class BatchOrder(Sampler):
    """Batch indices of an epoch: in order, or a permutation seeded by (seed, epoch) alone, so the
    order never depends on how often the loader was iterated (Lightning calls set_epoch). With
    `chunk`, yields lists of that many consecutive indices of the same order (the last may be
    shorter)."""

    def __init__(self, num_batches: int, shuffle: bool, seed: int, chunk: int | None = None) -> None:
        self.num_batches, self.shuffle, self.seed, self.chunk = num_batches, shuffle, seed, chunk
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches if self.chunk is None else -(-self.num_batches // self.chunk)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_batches, generator=generator).tolist()
        else:
            order = list(range(self.num_batches))
        if self.chunk is None:
            yield from order
        else:
            for start in range(0, self.num_batches, self.chunk):
                yield order[start : start + self.chunk]


def cached_batch_loader(*caches: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                        steps_per_call: int | None = None) -> DataLoader:
    """Batches of the caches (see BatchOrder); with `steps_per_call`, chunks of that many batches."""
    dataset = CachedBatches(*caches, batch_size=batch_size)
    order = BatchOrder(len(dataset), shuffle, seed, steps_per_call)
    # its own generator: iterating the loader leaves the global RNG alone
    return DataLoader(dataset, batch_size=None, sampler=order, generator=torch.Generator().manual_seed(seed))
