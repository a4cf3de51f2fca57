"""Perplexity of a streamed model, block by block, never the whole model on one device.

Embed every window (calib/capture.py's recorders: the model's own code builds masks and rotary
tables), run all windows through block 0, then block 1, ... (each loaded, moved to the device,
used and released), then the model's own head (final norm, lm_head, any logit soft-capping) window
batch by window batch, with the blocks replaced by modules that hand it the last block's outputs.
The hidden states of all windows stay on the host in the model's dtype (windows · seqlen · hidden).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.calib.capture import capture_block_inputs, kwargs_to, run_block
from omniquant_pl.eval.perplexity import WindowPerplexity, evaluation_windows, window_mean_nll

BlockContext = Callable[[nn.Module], contextlib.AbstractContextManager]


class _LastHidden(nn.Module):
    """Stands in for every block: returns the last block's outputs for the current batch."""

    def __init__(self, holder: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.holder["hidden"]


@contextlib.contextmanager
def head_only(model: nn.Module, spec: ArchSpec, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The model with its blocks swapped out and the rest (embeddings, norm, head) on `device`;
    yields the holder whose ``hidden`` the swapped-in blocks return."""
    backbone = model.get_submodule(spec.backbone)
    blocks = getattr(backbone, spec.layers)
    holder: dict[str, torch.Tensor] = {}
    setattr(backbone, spec.layers, nn.ModuleList([_LastHidden(holder) for _ in blocks]))
    try:
        model.to(device)
        yield holder
    finally:
        model.to("cpu")
        setattr(backbone, spec.layers, blocks)


@torch.no_grad()
def streamed_perplexity(
    model: nn.Module, spec: ArchSpec, load_block: Callable[[int], nn.Module], release_block: Callable[[int], None],
    token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int = 0, batch_size: int = 1,
    device: torch.device | str = "cpu", block_context: BlockContext | None = None,
) -> tuple[float, int]:
    """evaluate_perplexity's result for a model whose blocks are loaded one at a time: `load_block(i)`
    returns block i on the CPU, `release_block(i)` frees it; `block_context(block)` wraps each
    block's use (the RTN baseline quantizes it there). Returns (ppl, number of windows)."""
    device = torch.device(device)
    windows = evaluation_windows(token_ids, seqlen, max_windows)  # (n, seqlen)
    n_windows = windows.shape[0]
    captured = capture_block_inputs(model, spec, windows)
    hidden = captured.hidden_states  # (n, seqlen, hidden), on the host
    moved: dict[int, torch.Tensor] = {}
    for index in range(len(get_blocks(model, spec))):
        kwargs = kwargs_to(captured.layer_kwargs[index], device, moved=moved)
        block = load_block(index)
        try:
            with block_context(block) if block_context else contextlib.nullcontext():
                block.to(device)
                for start in range(0, n_windows, batch_size):
                    out = run_block(block, hidden[start : start + batch_size].to(device), kwargs)
                    hidden[start : start + batch_size] = out.to(hidden.device)
        finally:
            release_block(index)
    metric = WindowPerplexity().to(device)
    with head_only(model, spec, device) as holder:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            holder["hidden"] = hidden[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, seqlen, vocab)
            metric.update(window_mean_nll(logits, batch))
    ppl = metric.compute().item()
    return (ppl if math.isfinite(ppl) else float("inf")), n_windows


def streamed_evaluator(model: nn.Module, spec: ArchSpec, blocks, rtn_quant=None) -> Callable[..., tuple[float, int]]:
    """An evaluate_perplexity stand-in (same arguments) over `blocks` (a StreamedBlocks: each block as
    the run has it now); with `rtn_quant` (a QuantConfig), the RTN baseline of those settings."""
    from omniquant_pl.arch.registry import check_supported
    from omniquant_pl.quant.activation_hooks import use_quantized_attention
    from omniquant_pl.quant.rtn import rtn_block

    context = None
    if rtn_quant is not None:
        check_supported(spec, let=False, abits=rtn_quant.abits)  # RTN has no LET
        if rtn_quant.abits < 16:
            use_quantized_attention(model)

        def context(block: nn.Module):
            return rtn_block(block, spec, rtn_quant)

    def evaluate(model, token_ids, seqlen=2048, max_windows=0, batch_size=1, device="cpu"):
        return streamed_perplexity(model, spec, blocks.load_current, blocks.release, token_ids, seqlen, max_windows,
                                   batch_size, device, context)

    return evaluate
