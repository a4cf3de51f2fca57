"""train.keep_best: end each block with the lowest-loss of its trained, initial and RTN parameters."""
from __future__ import annotations

import logging
import math

import torch

from omniquant_pl.block_module import BlockModule

log = logging.getLogger(__name__)


def keep_best(index: int, module: BlockModule, initial_state: dict[str, torch.Tensor], metrics: dict,
              rtn: bool | str) -> None:
    """Keep whichever of the trained and initial parameters (and, with `rtn`, round-to-nearest) gave
    the lowest block loss (ties: trained first; non-finite losses never win), so no block ends worse
    than its start (or than RTN). `rtn` is train.keep_best_rtn: ``auto`` = where the block learns LET.
    Updates `metrics` (final_loss; trained_loss and restored when it switched)."""
    losses = {"trained": metrics["final_loss"], "initial": metrics["init_loss"]}
    weigh_rtn = (module.let is not None) if rtn == "auto" else rtn
    if weigh_rtn:
        losses["rtn"] = metrics["rtn_loss"]
    best = min(losses, key=lambda name: losses[name] if math.isfinite(losses[name]) else math.inf)
    if best == "trained" or not math.isfinite(losses[best]):
        return
    if best == "initial":
        module.load_learned_state(initial_state)
    else:
        module.make_rtn()
    log.warning("block %d: training ended at loss %.4g; kept the %s parameters (loss %.4g)",
                index, losses["trained"], best, losses[best])
    metrics["trained_loss"], metrics["final_loss"] = losses["trained"], losses[best]
    metrics["restored"] = best
