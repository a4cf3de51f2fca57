"""llama.cpp's search for the float scale (and minimum) of each K-quant sub-block, vectorized.

The reference quantizers of ``ggml-quants.c`` (no importance matrix) choose each sub-block's scale
with a small search before quantizing the scales themselves (kquant_grid.py):

    Q2_K  make_qkx2_quants(16 weights, nmax 3, weights |x|, rmin -0.5, rdelta 0.1, 15 steps, abs error)
    Q4_K  make_qkx2_quants(32, 15, weights av_x + |x|, -1.0, 0.1, 20 steps, squared error)
    Q5_K  make_qkx2_quants(32, 31, weights av_x + |x|, -0.5, 0.1, 15 steps, squared error)
    Q3_K  make_q3_quants(16, nmax 4, with its coordinate-descent refinement)
    Q6_K  make_qx_quants(16, nmax 32, rmse type 1: weights x², 18 candidate scales)

(av_x = sqrt(mean of x² over the sub-block)). Here every sub-block of a tensor is searched at once;
sums run element by element in llama.cpp's order and constants are float32, so that the result is
the C code's bit for bit (tests/test_kquant_grid.py compares the bytes with llama.cpp's own quantizer).
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15
F32 = np.float32


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int (adds 1.5·2^23): round half to even, as torch.round, for |v| < 2^22."""
    return torch.round(values)


def _first_largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B,) the first value of largest magnitude of each row (C: strict > while scanning)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, the_min, levels) of each row of x (B, n): the asymmetric fit, minimum subtracted (the_min
    >= 0), and the levels (B, n) of the best candidate."""
    n = x.shape[1]
    low, high = x[:, 0].clone(), x[:, 0].clone()
    sum_w = weights[:, 0].clone()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        low = torch.where(x[:, i] < low, x[:, i], low)
        high = torch.where(x[:, i] > high, x[:, i], high)
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high == low
    width = torch.where(flat, torch.ones_like(high), high - low)

    def error(scale: torch.Tensor, minimum: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(scale)
        for i in range(n):
            diff = scale * levels[:, i] + minimum - x[:, i]
            total = total + weights[:, i] * (diff.abs() if use_mad else diff * diff)
        return total

    def levels_at(iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return torch.clamp(nearest_int(iscale.unsqueeze(1) * (x - minimum.unsqueeze(1))), 0, nmax)  # (B, n)

    iscale = x.new_tensor(F32(nmax)) / width
    scale = 1 / iscale
    minimum = low
    best_levels = levels_at(iscale, minimum)
    best = error(scale, minimum, best_levels)
    for step in range(nstep + 1):  # as in C, each candidate starts from the best minimum found so far
        span = torch.where(flat, torch.ones_like(high), high - minimum)
        iscale = x.new_tensor(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        levels = levels_at(iscale, minimum)
        sum_l, sum_l2, sum_xl = (torch.zeros_like(scale) for _ in range(3))
        for i in range(n):
            wl = weights[:, i] * levels[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * levels[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        safe_l2 = torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2)
        this_scale = torch.where(positive, sum_xl / safe_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        current = error(this_scale, this_min, levels)
        better = (det > 0) & (current < best)
        best = torch.where(better, current, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
        best_levels = torch.where(better.unsqueeze(1), levels, best_levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, low, minimum)
    return scale, -minimum, torch.where(flat.unsqueeze(1), torch.zeros_like(best_levels), best_levels)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed scale, signed levels (B, n)) of each row of x (B, n), rmse type 1 (weights x²), no
    importance matrix (Q6_K)."""
    n = x.shape[1]
    extreme = _first_largest_magnitude(x)
    zero = extreme.abs() < GROUP_MAX_EPS
    extreme = torch.where(zero, torch.ones_like(extreme), extreme)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.clamp(nearest_int(iscale.unsqueeze(1) * x), -nmax, nmax - 1)  # (B, n)
        sum_lx, sum_l2 = torch.zeros_like(iscale), torch.zeros_like(iscale)
        for i in range(n):
            w = x[:, i] * x[:, i]
            sum_lx = sum_lx + w * x[:, i] * levels[:, i]
            sum_l2 = sum_l2 + w * levels[:, i] * levels[:, i]
        return sum_lx, sum_l2, levels

    sum_lx, sum_l2, best_levels = sums(-x.new_tensor(F32(nmax)) / extreme)
    scale = torch.where(sum_l2 != 0, sum_lx / torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2)),
                        torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2, levels = sums(-x.new_tensor(F32(nmax) + F32(0.1) * F32(step)) / extreme)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
        best = torch.where(better, scale * sum_lx, best)
        best_levels = torch.where(better.unsqueeze(1), levels, best_levels)
    best_levels = torch.where(zero.unsqueeze(1), torch.full_like(best_levels, -nmax), best_levels)
    return torch.where(zero, torch.zeros_like(scale), scale), best_levels


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed scale, signed levels (B, n)) of each row of x (B, n), with llama.cpp's coordinate-descent
    refinement (Q3_K)."""
    n = x.shape[1]
    extreme = _first_largest_magnitude(x)
    zero = extreme.abs() < GROUP_MAX_EPS
    iscale = -x.new_tensor(F32(nmax)) / torch.where(zero, torch.ones_like(extreme), extreme)
    levels = torch.clamp(nearest_int(iscale.unsqueeze(1) * x), -nmax, nmax - 1)  # (B, n)
    sum_lx, sum_l2 = torch.zeros_like(iscale), torch.zeros_like(iscale)
    for i in range(n):
        w = x[:, i] * x[:, i]
        sum_lx = sum_lx + w * x[:, i] * levels[:, i]
        sum_l2 = sum_l2 + w * levels[:, i] * levels[:, i]
    for _ in range(5):  # a pass that changes nothing is a fixed point: later passes change nothing either
        for i in range(n):
            w, xi, li = x[:, i] * x[:, i], x[:, i], levels[:, i]
            slx = sum_lx - w * xi * li
            sl2 = sum_l2 - w * li * li
            safe_slx = torch.where(slx > 0, slx, torch.ones_like(slx))
            proposed = torch.clamp(nearest_int(xi * sl2 / safe_slx), -nmax, nmax - 1)
            new_slx = slx + w * xi * proposed
            new_sl2 = sl2 + w * proposed * proposed
            accept = (slx > 0) & (proposed != li) & (new_sl2 > 0) & (
                new_slx * new_slx * sum_l2 > sum_lx * sum_lx * new_sl2)
            levels[:, i] = torch.where(accept, proposed, li)
            sum_lx = torch.where(accept, new_slx, sum_lx)
            sum_l2 = torch.where(accept, new_sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                        torch.zeros_like(sum_l2))
    levels = torch.where(zero.unsqueeze(1), torch.full_like(levels, -nmax), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def _mean_abs_weights(x: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K weights av_x + |x|, av_x = sqrt(sum x² / n) summed in order."""
    sum_x2 = torch.zeros_like(x[:, 0])
    for i in range(x.shape[1]):
        sum_x2 = sum_x2 + x[:, i] * x[:, i]
    mean = sum_x2 / x.new_tensor(F32(x.shape[1]))
    # sqrtf is correctly rounded; torch's float32 sqrt is not always (seen: 1 ulp off on a CPU), the float64
    # square root rounded to float32 is
    return torch.sqrt(mean.double()).float().unsqueeze(1) + x.abs()


@torch.no_grad()
def search_sub_blocks(rows: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """llama.cpp's search on rows (super-blocks, 256): the float sub-block scales (super-blocks, n_sub),
    the minima (amounts subtracted, >= 0) for the types that have them (else None), and the search's
    codes (super-blocks, 256; signed for Q3_K/Q6_K), which llama.cpp keeps in sub-blocks whose
    quantized scale is 0."""
    rows = rows.float()
    sub = 32 if type_name in ("Q4_K", "Q5_K") else 16
    x = rows.reshape(-1, sub)  # (super-blocks · n_sub, sub)
    shape = (rows.shape[0], 256 // sub)
    minimum = None
    if type_name == "Q6_K":
        scale, levels = make_qx_quants(x, 32)
    elif type_name == "Q3_K":
        scale, levels = make_q3_quants(x, 4)
    elif type_name == "Q2_K":
        scale, minimum, levels = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    elif type_name == "Q4_K":
        scale, minimum, levels = make_qkx2_quants(x, _mean_abs_weights(x), 15, -1.0, 0.1, 20, use_mad=False)
    else:  # Q5_K
        scale, minimum, levels = make_qkx2_quants(x, _mean_abs_weights(x), 31, -0.5, 0.1, 15, use_mad=False)
    return scale.reshape(shape), None if minimum is None else minimum.reshape(shape), levels.reshape(rows.shape)
