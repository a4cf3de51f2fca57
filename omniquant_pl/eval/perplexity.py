"""Perplexity exactly as the OmniQuant paper (and ../shared/data/README.md) computes it.

ids = tokenizer(text).input_ids; n = len(ids) // seqlen non-overlapping windows (tail dropped);
ppl = exp(sum(window_mean_nll * seqlen) / (n * seqlen)) = exp(mean of the windows' mean NLL),
where a window's mean NLL is over its seqlen - 1 next-token predictions.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from omniquant_pl.calib.data import document_windows_cached, load_text, tokenize_cached


class WindowPerplexity(Metric):
    """exp(mean over windows of the window's mean next-token NLL)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        # no cross-process sync: in a data-parallel calibration rank 0 evaluates alone
        super().__init__(sync_on_compute=False)
        self.add_state("nll_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("windows", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, window_mean_nll: torch.Tensor) -> None:
        self.nll_sum += window_mean_nll.double().sum()
        self.windows += window_mean_nll.numel()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.windows)


def window_mean_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL per window: logits (B, T, V) predict input_ids shifted by one -> (B,)."""
    batch, seqlen, vocab = logits.shape
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),  # (B·(T-1), V)
        input_ids[:, 1:].reshape(-1),
        reduction="none",
    )
    return nll.view(batch, seqlen - 1).mean(dim=1)


def evaluation_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int = 0) -> torch.Tensor:
    """1-D `token_ids` cut into consecutive windows of `seqlen` (at most `max_windows`; 0 = all)."""
    n_windows = token_ids.numel() // seqlen
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    return token_ids[: n_windows * seqlen].view(n_windows, seqlen)  # (n, seqlen)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """Perplexity of `model` on 1-D `token_ids`; returns (ppl, number of windows used). `on_batch(done,
    total)` is called after each batch of windows (a progress bar)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = evaluation_windows(token_ids, seqlen, max_windows)  # (n, seqlen)
    n_windows = windows.shape[0]
    metric = WindowPerplexity().to(device)
    was_training = model.training
    model.eval()
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        metric.update(window_mean_nll(logits, batch))
        if on_batch is not None:
            on_batch(min(start + batch_size, n_windows), n_windows)
    model.train(was_training)
    ppl = metric.compute().item()
    return (ppl if math.isfinite(ppl) else float("inf")), n_windows


def perplexity_on_source(
    model: nn.Module,
    tokenizer,
    source: str,
    seqlen: int = 2048,
    max_windows: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    evaluate: Callable[..., tuple[float, int]] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Perplexity on the evaluation split of a text source (see calib.data.load_text); a source's
    protocol cap on windows (c4_new: 256) applies on top of `max_windows`; the paper's C4 draws
    its 256 windows document by document. `evaluate` replaces evaluate_perplexity (same arguments:
    a streamed model's block-by-block evaluation); `on_batch`: see evaluate_perplexity."""
    text = load_text(source, "eval")
    if text.documents:  # windows drawn document by document (the paper's C4), already (n, seqlen)
        ids = document_windows_cached(tokenizer, text, text.document_windows, seqlen, text.document_seed).reshape(-1)
    else:
        ids = tokenize_cached(tokenizer, text)
    caps = [n for n in (max_windows, text.max_windows) if n]
    cap = min(caps, default=0)
    if evaluate is not None:
        ppl, windows = evaluate(model, ids, seqlen, cap, batch_size, device)
    else:
        ppl, windows = evaluate_perplexity(model, ids, seqlen, cap, batch_size, device, on_batch=on_batch)
    return {"ppl": ppl, "windows": windows, "seqlen": seqlen, "source": text.description}
