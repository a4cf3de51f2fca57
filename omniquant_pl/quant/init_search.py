"""quant.lwc_search (beyond the paper): each unit's learned clipping starts where the calibration-weighted
weight error is least, instead of at quant.lwc_init.

A linear's output error on an input x is Σ_j (Q(w)_j − w_j)·x_j per output row. Its mean square over
the calibration tokens, channel cross-terms dropped, is

    E(w) = Σ_j E[x_j²] · (Q(w)_j − w_j)²

the diagonal of GPTQ's Hessian, and what llama.cpp's importance matrix holds (``llama-imatrix``
collects the same per-channel mean squares; ``llama-quantize --imatrix`` weights its scale search
with them). A quantizer's units are independent (a min-max row or group, a legacy 32-weight block, a
K-quant super-block, an IQ4 block or super-block: nothing outside a unit changes its values), so
each unit takes, among its quantizer's `search_factors`, the one of least E: first one factor on
both ends, then the upper end with the lower held, then the lower with the upper held. The unit's
starting logits stay when no candidate is better. On min-max and legacy grids the candidates are
clipping factors σ(γ) in (0, 1]; on the K-quant and IQ4 grids, factors 2σ(γ) on llama.cpp's searched
scales (and minima) around 1.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from omniquant_pl import distributed
from omniquant_pl.calib.capture import linear_inputs

log = logging.getLogger(__name__)


@contextlib.contextmanager
def input_power(block: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Per-channel E[x²] over every token of each named linear's input (over every process's windows in a
    data-parallel run), filled in when the context exits without error."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        sums[name] = sums[name] + x.square().sum(0) if name in sums else x.square().sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    power: dict[str, torch.Tensor] = {}
    with linear_inputs(block, names, record):
        yield power
    for name in sorted(sums):
        power[name] = distributed.global_channel_mean(sums[name], counts[name])


def _unit_errors(quantizer: nn.Module, weight: torch.Tensor, power: torch.Tensor, unit: int) -> torch.Tensor:
    """(units,) the weighted error E of each unit of `weight` (out, in) under the quantizer's present logits."""
    error = (quantizer(weight).float() - weight.float()).square() * power  # (out, in)
    return error.reshape(-1, unit).sum(1)


@torch.no_grad()
def search_initial_clipping(quantizer: nn.Module, weight: torch.Tensor, power: torch.Tensor) -> tuple[float, float]:
    """Set the quantizer's clipping logits, unit by unit, to the candidate of least weighted error
    (module docstring). Returns E summed over the weight before and after. A quantizer without learned
    clipping is left as it is."""
    upper, lower = quantizer.upper_logit, quantizer.lower_logit
    if upper is None or not quantizer.clipping_enabled:
        return math.nan, math.nan
    unit = quantizer.search_unit
    units = weight.numel() // unit
    power = power.to(weight.device, torch.float32).reshape(1, -1)  # (1, in)
    views = [p.view(units, -1) for p in (upper, lower) if p is not None]  # (units, logits per unit)
    best = [view.clone() for view in views]
    best_error = _unit_errors(quantizer, weight, power, unit)
    before = best_error.sum().item()
    candidates = quantizer.search_logits().tolist()
    # one factor on both ends, then each end alone with the other at its best so far
    passes = ([0, 1], [0], [1]) if len(views) == 2 else ([0],)
    for moving in passes:
        for logit in candidates:
            for index, view in enumerate(views):
                view.copy_(torch.full_like(view, logit) if index in moving else best[index])
            error = _unit_errors(quantizer, weight, power, unit)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            for index in moving:
                best[index] = torch.where(better.unsqueeze(1), torch.full_like(best[index], logit), best[index])
    for view, chosen in zip(views, best):
        view.copy_(chosen)
    return before, best_error.sum().item()


def search_block_clipping(index: int, quant_linears: dict[str, nn.Module], input_power: dict[str, torch.Tensor]) -> None:
    """Every QuantLinear of block `index` whose input statistics were gathered starts at its search."""
    before = after = 0.0
    for name, linear in quant_linears.items():
        if linear.weight_quantizer is not None and name in input_power:
            linear.weight_quantizer.to(linear.weight.device)  # built on the CPU; the block is already on the device
            errors = search_initial_clipping(linear.weight_quantizer, linear.weight, input_power[name])
            before, after = before + errors[0], after + errors[1]
    log.info("block %d: lwc_search start, weighted weight error %.4g -> %.4g", index, before, after)
