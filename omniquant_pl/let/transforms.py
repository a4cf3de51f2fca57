"""The three LET transforms as pure functions, shared by training (differentiable, applied to the
frozen parameters at every step) and fusing (applied once, in place). Each keeps the block's
function unchanged when nothing is quantized:

  norm -> linears   x' = (x - shift) / scale;  W' = W·diag(scale);  b' = b + W·shift
                    (a norm multiplying by (offset + w), Gemma's (1 + w): w' = (offset + w)/scale - offset)
  linear -> linear  v' = (v - shift) / scale on the source's outputs; the target's inputs
                    get W'·diag(scale), b' + W·shift (softmax rows sum to 1, so a shift on v
                    passes through attention unchanged)
  q·kᵀ              q' = q / s, k' = k·s per head channel; with rotary embeddings s must be equal
                    on the two channels that rotate together, so it commutes with the rotation

A fused linear's part (Phi-3's "v" rows of qkv_proj) goes through the same functions: the caller
takes its rows out and puts them back (let/rows.py).

Every scale goes through `guarded_scale` first (|s| >= 1e-2), in training and fusing alike.
"""
from __future__ import annotations

import torch

# Smallest |scale| a LET transform uses (the official code's threshold): norm/s and W/s stay finite
# in fp16/bf16 however far training pushes a scale toward 0.
MIN_SCALE_MAGNITUDE = 1e-2


def guarded_scale(scale: torch.Tensor, minimum: float = MIN_SCALE_MAGNITUDE) -> torch.Tensor:
    """`scale` with every |value| below `minimum` raised to ±minimum (its sign kept, 0 counts as
    +). Straight-through: the gradient passes to the raw scale unchanged, so a guarded channel can
    still learn its way back (the official code clamps the parameter in place each step instead)."""
    magnitude_floor = torch.where(scale < 0, -minimum, minimum).to(scale.dtype)
    floored = torch.where(scale.abs() < minimum, magnitude_floor, scale)
    return scale + (floored - scale).detach()


def absorb_shift(bias: torch.Tensor | None, weight: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor | None:
    """Bias of a linear whose input was shifted by -shift: b + W·shift (b unchanged without shift)."""
    if shift is None:
        return bias
    return (bias if bias is not None else 0) + weight @ shift


def norm_into_linears(
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    linear_weights: list[torch.Tensor],
    linear_biases: list[torch.Tensor | None],
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """Move a per-channel scale (and shift) from a norm's output into the linears it feeds; the
    norm multiplies by (weight_offset + norm_weight) (Gemma: 1 + w), so that is what is divided."""
    if shift is not None and norm_bias is None:
        raise ValueError("a shift needs a norm bias to absorb it")
    new_norm_weight = (norm_weight + weight_offset) / scale - weight_offset
    new_norm_bias = None if norm_bias is None else (norm_bias - (shift if shift is not None else 0)) / scale
    new_weights = [w * scale for w in linear_weights]  # (out, in) * (in,)
    new_biases = [absorb_shift(b, w, shift) for w, b in zip(linear_weights, linear_biases, strict=True)]
    return new_norm_weight, new_norm_bias, new_weights, new_biases


def expand_kv_channels(values: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """(kv_heads·head_dim,) -> (kv_heads·groups·head_dim,): the layout of the attention output,
    where query head h reads key/value head h // groups."""
    head_dim = values.shape[-1] // kv_heads
    return values.view(kv_heads, 1, head_dim).expand(kv_heads, groups, head_dim).reshape(-1)


def linear_into_linear(
    source_weight: torch.Tensor,
    source_bias: torch.Tensor | None,
    target_weight: torch.Tensor,
    target_bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    kv_heads: int,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """v_proj -> o_proj: divide v's output channels by `scale` (kv channels), multiply the
    matching o_proj input columns (every query head of the group) by it."""
    if shift is not None and source_bias is None:
        raise ValueError("a shift on v needs a v_proj bias to absorb it")
    new_source_weight = source_weight / scale[:, None]  # (kv·hd, in) rows
    new_source_bias = None
    if source_bias is not None:
        new_source_bias = (source_bias - (shift if shift is not None else 0)) / scale
    wide_scale = expand_kv_channels(scale, kv_heads, groups)  # (heads·hd,)
    new_target_weight = target_weight * wide_scale
    wide_shift = None if shift is None else expand_kv_channels(shift, kv_heads, groups)
    new_target_bias = absorb_shift(target_bias, target_weight, wide_shift)
    return new_source_weight, new_source_bias, new_target_weight, new_target_bias


def qk_channel_scale(param: torch.Tensor, rotary_pairs: str | None, rotary_dim: int | None = None) -> torch.Tensor:
    """Per-head-channel scale (kv_heads, head_dim) from its free parameters.

    The first `rotary_dim` channels of a head rotate (None: all of them); param holds one value per
    rotating pair, then one per unrotated channel (partial rotary embeddings). ``half``
    (rotate_half: channel d rotates with d + rotary_dim/2): the pair values are repeated on both
    halves; ``interleaved`` (2i with 2i+1): repeated pairwise. None (no rotary embedding): param
    is already (kv_heads, head_dim).
    """
    if rotary_pairs is None:
        return param
    pairs = param.shape[-1] if rotary_dim is None else rotary_dim // 2
    rotating, free = param[..., :pairs], param[..., pairs:]  # (kv_heads, pairs), (kv_heads, unrotated)
    if rotary_pairs == "half":
        rotating = torch.cat([rotating, rotating], dim=-1)
    elif rotary_pairs == "interleaved":
        rotating = rotating.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"rotary_pairs {rotary_pairs!r}: use 'half', 'interleaved' or None")
    return torch.cat([rotating, free], dim=-1)


def qk_scale(
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    channel_scale: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """q / s and k · s, with s of shape (kv_heads, head_dim) shared by each query group."""
    kv_heads = channel_scale.shape[0]  # channel_scale: (kv_heads, head_dim)
    k_scale = channel_scale.reshape(-1)  # (kv·hd,)
    q_scale = expand_kv_channels(k_scale, kv_heads, groups)  # (heads·hd,)
    new_q_weight = q_weight / q_scale[:, None]
    new_q_bias = None if q_bias is None else q_bias / q_scale
    new_k_weight = k_weight * k_scale[:, None]
    new_k_bias = None if k_bias is None else k_bias * k_scale
    return new_q_weight, new_q_bias, new_k_weight, new_k_bias
