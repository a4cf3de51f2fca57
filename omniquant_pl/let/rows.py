"""Reading and writing one part of a fused linear's output rows (arch.base.FusedRows), out of
place and differentiably: LET transforms act on the part as if it were its own linear."""
from __future__ import annotations

import torch

from omniquant_pl.arch.base import FusedRows


def _pieces(tensor: torch.Tensor, layout: FusedRows, geometry) -> list[torch.Tensor]:
    """The parts of `tensor`'s rows (weight (out, in) or bias (out,)), each (repeat, size, ...)."""
    repeat, sizes = layout.sizes(tensor.shape[0], geometry.heads, geometry.kv_heads, geometry.head_dim)
    return list(tensor.unflatten(0, (repeat, -1)).split(sizes, dim=1))  # (repeat, Σsizes, ...) -> parts


def take_rows(tensor: torch.Tensor, layout: FusedRows, part: str, geometry) -> torch.Tensor:
    """The rows of `part`, in head order: (repeat·size, ...)."""
    return _pieces(tensor, layout, geometry)[layout.part_names.index(part)].flatten(0, 1)


def replace_rows(tensor: torch.Tensor, layout: FusedRows, part: str, value: torch.Tensor, geometry) -> torch.Tensor:
    """`tensor` with the rows of `part` replaced by `value` (as take_rows returns them)."""
    pieces = _pieces(tensor, layout, geometry)
    index = layout.part_names.index(part)
    pieces[index] = value.unflatten(0, (pieces[index].shape[0], -1))  # (repeat, size, ...)
    return torch.cat(pieces, dim=1).flatten(0, 1)  # (out, ...)
