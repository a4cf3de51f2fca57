"""The description of one model family: module paths and the OmniQuant groups of a block.

Groups (paper notation):
  qkv  norm before attention  -> q/k/v projections
  fc1  norm before the MLP    -> up/gate projections (or fc1)
  out  v projection           -> output projection (v->o)
  fc2  MLP down projection (or fc2)
  up_down  gated MLPs only: up projection -> down projection (beyond the paper; exact because the
       gate's activation multiplies up's output elementwise, so a scale on up's output channels
       passes to down's input columns unchanged)

A weight-only spec (a model with no table entry, described generically by arch/generic.py) has no
attention module and no groups: its linears are all `extra_linears`, quantized with LWC alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class NormGroup:
    """A norm whose output feeds `linears` (a LET scale on it is folded into those linears)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearGroup:
    """A linear (`source`, e.g. v_proj) whose output feeds `target` (e.g. o_proj)."""

    source: str
    target: str


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its blocks, and how each block's modules group for OmniQuant."""

    name: str
    model_types: tuple[str, ...]
    backbone: str  # module whose forward(input_ids=...) embeds tokens and runs `layers`
    layers: str  # attribute of the backbone holding the nn.ModuleList of blocks
    # LET and activation quantization: all four, or (weight-only) none of them
    attention: str | None = None  # attention module inside a block
    qkv: NormGroup | None = None
    fc1: NormGroup | None = None
    out: LinearGroup | None = None
    fc2: tuple[str, ...] = ()
    norm_has_bias: bool = False
    extra_linears: tuple[str, ...] = field(default=())  # linears in no group (weight-only specs: all)
    # LET: which channels rotate together in the rotary embedding ("half": d with d + head_dim/2,
    # "interleaved": 2i with 2i+1, None: no rotary), whether a q/k scale is valid at all (not with
    # per-head q/k norms), and whether biases can absorb shifts (OPT).
    rotary_pairs: str | None = "half"
    let_qk: bool = True
    let_shifts: bool = False
    up_down: LinearGroup | None = None  # gated MLPs: the LET scale on down_proj's input (quant.let_up_down)

    def __post_init__(self) -> None:
        given = [name for name in ("attention", "qkv", "fc1", "out") if getattr(self, name) is not None]
        if given and len(given) < 4:
            raise ValueError(f"ArchSpec '{self.name}' gives {', '.join(given)} but not all of attention, qkv, fc1, "
                             "out: give all four (LET and activation quantization) or none (weight-only)")
        if not self.linear_names:
            raise ValueError(f"ArchSpec '{self.name}' names no linears: give the groups or extra_linears")

    @property
    def weight_only(self) -> bool:
        """No LET groups and no attention module: LWC only (quant.let and abits < 16 are refused)."""
        return self.qkv is None

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order, each once."""
        grouped = [] if self.weight_only else [*self.qkv.linears, self.out.target, *self.fc1.linears]
        return tuple(dict.fromkeys([*grouped, *self.fc2, *self.extra_linears]))

    def check_block(self, block: nn.Module, index: int = 0) -> None:
        """Fail early if a block does not have the modules this table names (or has more)."""
        found = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        missing = [n for n in self.linear_names if n not in found]
        unexpected = sorted(found - set(self.linear_names))
        if missing or unexpected:
            raise RuntimeError(
                f"block {index} of this {self.name} model does not match the '{self.name}' adapter: "
                f"missing linears {missing}, unlisted linears {unexpected}. "
                "The installed transformers may have renamed modules; please report it."
            )
