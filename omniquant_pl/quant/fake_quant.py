"""The quantizer math as pure tensor functions, run eagerly or fused by torch.compile.

Eager, `lwc_fake_quantize` is ~15 elementwise kernels over the whole weight in each direction
(fp32 copies, round, clamp, STE...): on a 7B-shaped block that costs more than the matmuls. Fused
(a run with `train.compile: quantizers`, see compile_policy.py) it is one reduction and one
elementwise kernel per direction, with the same math. Functions take only tensors and Python
scalars, so one compiled graph serves every block of a model; a failure to compile falls back to
eager with a warning.
"""
from __future__ import annotations

import torch

from omniquant_pl.compile_policy import compiled, current_policy
from omniquant_pl.quant.primitives import RowGrid, fake_quantize, fit_row_grid


def row_grid(
    x: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rule: str,
) -> RowGrid:
    """The grid of each row of fp32 `x` (rows, row_size) under `rule` (see primitives).

    upper/lower_logit (rows, 1): learnable clipping xmax·σ(γ), xmin·σ(β) (None = plain min-max; on
    gguf_sym the row's first largest-magnitude value is clipped by the factor of its sign).
    minmax_asym widens each row's range to include 0 (zeros stay exact, and the zero point always
    lies on the integer grid, as integer formats store it).
    """
    xmax = x.amax(dim=-1, keepdim=True)  # (rows, 1)
    xmin = x.amin(dim=-1, keepdim=True)
    if rule == "minmax_asym":
        xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
    # llama.cpp's Q4_0/Q5_0: the first value of largest magnitude, with its sign
    extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)) if rule == "gguf_sym" else None
    if upper_logit is not None:
        upper, lower = torch.sigmoid(upper_logit), torch.sigmoid(lower_logit)
        xmax, xmin = xmax * upper, xmin * lower
        if extreme is not None:
            extreme = extreme * torch.where(extreme > 0, upper, lower)
    return fit_row_grid(xmin, xmax, extreme, qmin, qmax, rule)


def lwc_fake_quantize(
    rows: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rule: str,
    rounding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake quantization of each row (last dim) of `rows` on its `row_grid`, in fp32, returned in
    the dtype of `rows`; `rounding` (rows, row_size): learned offsets in code units (see freedoms.py)."""
    x = rows.float()
    grid = row_grid(x, upper_logit, lower_logit, qmin, qmax, rule)
    return fake_quantize(x, grid, qmin, qmax, rule, rounding).to(rows.dtype)


def fake_quantize_rows(
    rows: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rule: str,
    rounding: torch.Tensor | None = None,
) -> torch.Tensor:
    """`lwc_fake_quantize`, fused where the run's compile policy asks for ``quantizers`` (eager after
    a compiler failure, for the rest of that run)."""
    policy = current_policy()
    if policy is not None and policy.allows("quantizers"):
        try:
            return compiled(lwc_fake_quantize, dynamic=False)(rows, upper_logit, lower_logit, qmin, qmax, rule,
                                                              rounding)
        except Exception as err:  # noqa: BLE001 - any compiler failure: keep calibrating, eagerly
            policy.fail("quantizers", err)
    return lwc_fake_quantize(rows, upper_logit, lower_logit, qmin, qmax, rule, rounding)
