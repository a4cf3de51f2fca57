"""Learned freedoms of a weight quantizer: what a block may learn about each quantized weight.

Each freedom names the WeightQuantizer parameters it owns, their keys in the learned state (and so
in checkpoints and learned_params.safetensors), the learning rate that trains them and how to make
it do nothing (its identity: the block then computes round-to-nearest with what remains). Adding a
freedom is one entry here plus its use in `WeightQuantizer.forward` / `quantize`.

- ``lwc`` (the paper's): per row (channel or group) clipping logits γ, β; the range is
  xmax·σ(γ), xmin·σ(β).
- ``rounding`` (beyond the paper, AutoRound's idea): a per-weight offset V added in code space before
  rounding, used clamped to [-0.5, 0.5]; at V = 0 the rounding is to nearest.
- ``weights`` (beyond the paper, EfficientQAT's Block-AP idea): a per-weight delta ΔW added to the
  weight before quantization, so training moves the weights themselves; the codes stay on the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

# σ(30) = 1 - 9e-14, which is 1.0 in fp32 (and in bf16): x · σ(30) == x exactly
NO_CLIPPING_LOGIT = 30.0
ROUNDING_LIMIT = 0.5  # a rounding offset moves a weight at most to the next code


@dataclass(frozen=True)
class Freedom:
    name: str
    attributes: tuple[str, ...]  # WeightQuantizer parameters (None where the freedom is off)
    state_keys: tuple[str, ...]  # their keys in the learned state, after "<weight path>."
    lr_field: str  # the TrainConfig field with their learning rate
    identity: float  # the value at which the freedom does nothing


FREEDOMS: dict[str, Freedom] = {
    freedom.name: freedom for freedom in (
        Freedom("lwc", ("upper_logit", "lower_logit"), ("lwc.upper", "lwc.lower"), "lwc_lr", NO_CLIPPING_LOGIT),
        Freedom("rounding", ("rounding",), ("rounding",), "rounding_lr", 0.0),
        Freedom("weights", ("weight_delta",), ("weight_delta",), "weight_lr", 0.0),
    )
}
