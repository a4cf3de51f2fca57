"""train.keep_best: end each block with the lowest-loss of its trained, initial and (plan.keep_best_rtn)
RTN parameters."""
from __future__ import annotations

import logging
import math

import torch

from omniquant_pl.block_module import BlockModule
from omniquant_pl.results import BlockResult

log = logging.getLogger(__name__)


def keep_best(index: int, module: BlockModule, initial_state: dict[str, torch.Tensor], result: BlockResult,
              rtn: bool) -> None:
    """Keep whichever of the trained and initial parameters (and, with `rtn`, round-to-nearest) gave
    the lowest block loss (ties: trained first; non-finite losses never win), so no block ends worse
    than its start (or than RTN). Updates `result` (final_loss; trained_loss and restored when it
    switched)."""
    losses = {"trained": result.final_loss, "initial": result.init_loss}
    if rtn:
        losses["rtn"] = result.rtn_loss
    best = min(losses, key=lambda name: losses[name] if math.isfinite(losses[name]) else math.inf)
    if best == "trained" or not math.isfinite(losses[best]):
        return
    if best == "initial":
        module.load_learned_state(initial_state)
    else:
        module.make_rtn()
    log.warning("block %d: training ended at loss %.4g; kept the %s parameters (loss %.4g)",
                index, losses["trained"], best, losses[best])
    result.trained_loss, result.final_loss, result.restored = losses["trained"], losses[best], best
