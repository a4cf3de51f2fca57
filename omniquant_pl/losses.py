"""Block losses: how far the quantized block's output is from its target. `train.loss` picks one.

Every loss takes (output, target), both (batch, tokens, hidden), and returns a scalar in fp32.
A new loss is one function and one registry entry here.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# relative_mse's floor on a token's mean square target, so an all-zero token cannot divide by zero
RELATIVE_MSE_EPS = 1e-6


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: mean squared error over every token and channel."""
    return F.mse_loss(output.float(), target.float())


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each token's squared error divided by its target's mean square, averaged over tokens.

    What the next block sees of the residual stream passes through an RMSNorm first, so an error
    matters relative to its token's size. Plain MSE weights a token by its size squared: on models
    with massive activations (attention-sink tokens 100-1000x larger than the rest) a few tokens
    then make nearly all of the loss from that block on.
    """
    output, target = output.float(), target.float()
    error = (output - target).pow(2).mean(-1)  # (batch, tokens)
    size = target.pow(2).mean(-1).clamp(min=RELATIVE_MSE_EPS)  # (batch, tokens)
    return (error / size).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse,
    "relative_mse": relative_mse,
}
