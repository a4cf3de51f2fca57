"""The quantizer math as pure tensor functions, run eagerly or fused by torch.compile.

Eager, `lwc_fake_quantize` is ~15 elementwise kernels over the whole weight in each direction
(fp32 copies, round, clamp, STE...): on a 7B-shaped block that costs more than the matmuls. Fused
(`use_fused_quantizers(True)`) it is one reduction and one elementwise kernel per direction, with
the same math. Functions take only tensors and Python scalars, so one compiled graph serves every
block of a model; a failure to compile falls back to eager with a warning.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

from omniquant_pl.quant.primitives import fake_quantize, scale_and_zero

log = logging.getLogger(__name__)


def row_grid(
    x: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    symmetric: bool,
    keep_zero: bool,
    float_minimum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (rows, 1) of each row of fp32 `x` (rows, row_size): an integer zero point,
    or with `float_minimum` the (clipped) row minimum.

    upper/lower_logit (rows, 1): learnable clipping xmax·σ(γ), xmin·σ(β) (None = plain min-max).
    keep_zero: widen each row's range to include 0 (zeros stay exact, and an asymmetric zero
    point always lies on the integer grid, as integer formats store it).
    The zero point is rounded without STE; gradients reach the logits through the scale.
    """
    xmax = x.amax(dim=-1, keepdim=True)  # (rows, 1)
    xmin = x.amin(dim=-1, keepdim=True)
    if keep_zero:
        xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
    if upper_logit is not None:
        xmax = xmax * torch.sigmoid(upper_logit)
        xmin = xmin * torch.sigmoid(lower_logit)
    return scale_and_zero(xmin, xmax, qmin, qmax, symmetric, float_minimum)


def lwc_fake_quantize(
    rows: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    symmetric: bool,
    keep_zero: bool,
    float_minimum: bool = False,
) -> torch.Tensor:
    """Min-max fake quantization of each row (last dim) of `rows` on the grid of `row_grid`, in
    fp32, returned in the dtype of `rows`."""
    x = rows.float()
    scale, offset = row_grid(x, upper_logit, lower_logit, qmin, qmax, symmetric, keep_zero, float_minimum)
    return fake_quantize(x, scale, offset, qmin, qmax, float_minimum).to(rows.dtype)


_fused: Callable[..., torch.Tensor] | None = None
_enabled = False


def _compiled() -> Callable[..., torch.Tensor]:
    global _fused
    if _fused is None:
        import torch._dynamo

        # every linear shape, grad mode and batch size is one graph: allow plenty of them
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _fused = torch.compile(lwc_fake_quantize, dynamic=False)
    return _fused


def fake_quantize_rows(
    rows: torch.Tensor,
    upper_logit: torch.Tensor | None,
    lower_logit: torch.Tensor | None,
    qmin: int,
    qmax: int,
    symmetric: bool,
    keep_zero: bool = False,
    float_minimum: bool = False,
) -> torch.Tensor:
    """`lwc_fake_quantize`, fused when enabled (falls back to eager if compilation fails)."""
    global _enabled
    if _enabled:
        try:
            return _compiled()(rows, upper_logit, lower_logit, qmin, qmax, symmetric, keep_zero, float_minimum)
        except Exception as err:  # noqa: BLE001 - any compiler failure: keep calibrating, eagerly
            log.warning("fused quantizers unavailable (%s: %s); running them eagerly", type(err).__name__, err)
            _enabled = False
    return lwc_fake_quantize(rows, upper_logit, lower_logit, qmin, qmax, symmetric, keep_zero, float_minimum)


@contextlib.contextmanager
def use_fused_quantizers(enabled: bool) -> Iterator[None]:
    """Run every quantizer through the fused (compiled) kernels inside the context."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous
