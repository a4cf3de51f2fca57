"""Scoring a GGUF file in llama.cpp itself (llama-cpp-python) on given token ids.

Token ids go in directly (no llama.cpp tokenization), so a GGUF and a torch model are scored on
the same windows with the project's perplexity protocol (see eval/perplexity.py).

Models load with llama.cpp's extra buffer types off (`use_extra_bufts`): on CPUs that report AMX
inside VMs that do not enable it (this project's CI machines), llama.cpp's AMX matmul dies on an
illegal instruction. Off, matmuls run through ggml's regular CPU kernels (no weight repacking).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from omniquant_pl.export.llama_cpp import captured_log, require_llama_cpp

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _without_extra_buffers():
    """llama_cpp.Llama builds its model parameters from llama.cpp's defaults: turn the extra buffer
    types off in them for the duration (see the module docstring)."""
    from llama_cpp import llama_cpp as api

    defaults = api.llama_model_default_params
    if "use_extra_bufts" not in dict(api.llama_model_params._fields_):
        log.warning("this llama-cpp-python cannot turn llama.cpp's extra buffer types off; on CPUs that report AMX "
                    "inside VMs llama.cpp may die on an illegal instruction: pip install -U llama-cpp-python")

    def params():
        value = defaults()
        value.use_extra_bufts = False
        return value

    api.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_model_default_params = defaults


def load_gguf(path: Path, context: int, threads: int | None = None):
    """A llama.cpp model with a context of `context` tokens that keeps every position's logits."""
    llama_cpp = require_llama_cpp()
    with captured_log(), _without_extra_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=min(context, 512), logits_all=True,
                               n_threads=threads or os.cpu_count(), verbose=False)


def window_nll(model, window: list[int]) -> float:
    """Mean next-token NLL of one window: logits at position t score token t+1."""
    model.reset()
    model.eval(window)
    logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)  # (T-1, vocab)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    targets = np.asarray(window[1:])
    return float(np.mean(log_z - logits[np.arange(len(targets)), targets]))


def gguf_perplexity(path: Path, token_ids: torch.Tensor, seqlen: int, max_windows: int = 0,
                    threads: int | None = None) -> dict:
    """Perplexity of a GGUF on 1-D `token_ids`: the first `max_windows` (0 = all) non-overlapping
    windows of `seqlen` tokens, exp(mean of the windows' mean NLL)."""
    windows = token_ids.numel() // seqlen
    if max_windows:
        windows = min(windows, max_windows)
    model = load_gguf(path, seqlen, threads)
    nll = [window_nll(model, token_ids[i * seqlen : (i + 1) * seqlen].tolist()) for i in range(windows)]
    del model
    return {"ppl": math.exp(sum(nll) / len(nll)), "windows": windows, "seqlen": seqlen, "window_nll": nll}
