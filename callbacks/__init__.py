"""The built-in callbacks of a calibration run, and the one place they are assembled.

`with_defaults(user)` is what `omniquant_pl.calibrate` runs with: the defaults below, each replaced
by a user callback of the same class, then the user's callbacks."""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from callbacks.fuse import FuseCallback
from callbacks.perplexity import PerplexityCallback
from callbacks.plot import LossPlotCallback
from callbacks.progress import ProgressCallback


def default_callbacks() -> list[Callback]:
    return [FuseCallback(), PerplexityCallback(), ProgressCallback(), LossPlotCallback()]


def with_defaults(user: list[Callback] | None = None) -> list[Callback]:
    """The default callbacks (those whose class the user gives replaced by the user's) + the user's;
    the evaluation draws its progress bars in the run's ProgressCallback."""
    user = list(user or [])
    replaced = {type(callback) for callback in user}
    callbacks = [callback for callback in default_callbacks() if type(callback) not in replaced] + user
    progress = next((c for c in callbacks if isinstance(c, ProgressCallback)), None)
    for callback in callbacks:
        if isinstance(callback, PerplexityCallback) and callback.progress is None and progress is not None:
            callback.progress = progress.evaluation_task
    return callbacks


__all__ = ["FuseCallback", "LossPlotCallback", "PerplexityCallback", "ProgressCallback", "default_callbacks",
           "with_defaults"]
