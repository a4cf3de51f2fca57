"""One fallback policy for compiling, held per run.

A run asks for `train.compile` (the block step, or only the quantizer math) and `train.cuda_graph`
(resolved in the plan). Whatever fails to compile or record is reported once with a warning and
stays off for the rest of this run only: a later run in the same process tries again. The compiled
functions themselves are cached for the process (compiling once serves every block and run).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

PARTS = ("block", "quantizers", "cuda_graph")  # what a run can compile or record


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class CompilePolicy:
    """What this run compiles (`mode`: block | quantizers | off; `cuda_graph`), and what failed."""

    def __init__(self, mode: str = "off", cuda_graph: bool = False) -> None:
        self.mode, self.cuda_graph = mode, cuda_graph
        self.failed: dict[str, str] = {}  # part -> the first line of its error

    def allows(self, part: str) -> bool:
        """Whether `part` (see PARTS) is asked for and has not failed in this run."""
        asked = self.cuda_graph if part == "cuda_graph" else self.mode == part
        return asked and part not in self.failed

    def fail(self, part: str, err: BaseException) -> None:
        """Turn `part` off for the rest of this run, with one warning."""
        if part not in self.failed:
            self.failed[part] = first_line(err)
            what = {"block": "compiling the block step", "quantizers": "fused quantizers",
                    "cuda_graph": "recording the step as a CUDA graph"}[part]
            log.warning("%s failed (%s); running eagerly for the rest of this run", what, self.failed[part])


@functools.cache
def compiled(fn: Callable, **options) -> Callable:
    """`torch.compile(fn, **options)`, once per process; plenty of graphs allowed (every linear shape,
    grad mode and batch size is one)."""
    import torch
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, **options)


_active: contextvars.ContextVar[CompilePolicy | None] = contextvars.ContextVar("omniquant_compile_policy",
                                                                                default=None)


@contextlib.contextmanager
def active_policy(policy: CompilePolicy | None) -> Iterator[None]:
    """Make `policy` the one that code deep in the quantizers consults (fused quantizers) within the context."""
    token = _active.set(policy)
    try:
        yield
    finally:
        _active.reset(token)


def current_policy() -> CompilePolicy | None:
    return _active.get()
