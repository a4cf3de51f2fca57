"""The description of one model family: module paths and the OmniQuant groups of a block.

Groups (paper notation):
  qkv  norm before attention  -> q/k/v projections (with parallel attention sharing one norm, as
       Falcon-7B: the MLP's input linears too, and no fc1 group)
  fc1  norm before the MLP    -> up/gate projections (or fc1)
  out  v projection           -> output projection (v->o)
  fc2  MLP down projection (or fc2)
  up_down  gated MLPs only: up projection -> down projection (beyond the paper; exact because the
       gate's activation multiplies up's output elementwise, so a scale on up's output channels
       passes to down's input columns unchanged)

Fused linears (Phi-3's qkv_proj and gate_up_proj) are described by a `FusedRows` layout of their
output rows; a group then names the part it acts on (`LinearGroup(..., source_rows="v")`), and the
q·k scale finds q and k as the parts named "q" and "k".

A family whose blocks differ by config (Falcon: one or two norms, parallel or sequential, rotary or
ALiBi) is one entry with `variants`: field changes for the configs they match, resolved by
`ArchSpec.for_config` (the registry does it for every model and config).

A mixture of experts whose experts are 3-D parameters of one module (Mixtral, Qwen3-MoE:
`gate_up_proj` (experts, 2·intermediate, hidden) and `down_proj` (experts, hidden, intermediate)) is
described by `Experts`; a group names an expert tensor by its parameter path
("mlp.experts.gate_up_proj") and the router by its module ("mlp.gate", whose `weight` LET scales
like a linear's but which is never quantized).

A weight-only spec (a model with no table entry, described generically by arch/generic.py) has no
attention module and no groups: its linears are all `extra_linears`, quantized with LWC alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class NormGroup:
    """A norm whose output feeds `linears` (a LET scale on it is folded into those linears)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearGroup:
    """A linear (`source`, e.g. v_proj) whose output feeds `target` (e.g. o_proj); with
    `source_rows`, only that part of a fused source's rows does (e.g. the "v" rows of qkv_proj)."""

    source: str
    target: str
    source_rows: str | None = None  # a part of the source's FusedRows layout; None: all its rows


# Sizes of a FusedRows part, in rows: query heads, key/value heads, the query heads of one kv head,
# one head (each times head_dim); "share": an equal share of the rows the sized parts leave.
ROW_SIZES = ("heads", "kv_heads", "group", "head", "share")
ROW_REPEATS = (1, "heads", "kv_heads")


@dataclass(frozen=True)
class FusedRows:
    """The output rows of one fused linear as named parts, in order, repeated `repeat` times.

    Phi-3's qkv_proj is q|k|v once: parts (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads"));
    its gate_up_proj is two equal halves: (("gate", "share"), ("up", "share")). A per-head
    interleaving such as (kv_heads, groups + 2, head_dim) is repeat "kv_heads" with parts
    (("q", "group"), ("k", "head"), ("v", "head")). A part's rows, gathered over the repetitions,
    are in head order. The parts of a fused attention projection are named "q", "k" and "v".
    """

    linear: str
    parts: tuple[tuple[str, str], ...]  # (name, size: one of ROW_SIZES)
    repeat: int | str = 1  # one of ROW_REPEATS

    def __post_init__(self) -> None:
        names = [name for name, _ in self.parts]
        bad = [size for _, size in self.parts if size not in ROW_SIZES]
        if len(names) < 2 or len(set(names)) != len(names) or bad or self.repeat not in ROW_REPEATS:
            raise ValueError(f"FusedRows '{self.linear}': parts {self.parts} repeat {self.repeat!r}; give two or more "
                             f"uniquely named parts sized {', '.join(ROW_SIZES)} and a repeat of {ROW_REPEATS}")

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    def sizes(self, out_features: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, tuple[int, ...]]:
        """(repeat, rows of each part in one repetition) for a linear with `out_features` rows."""
        repeat = self.repeat if isinstance(self.repeat, int) else {"heads": heads, "kv_heads": kv_heads}[self.repeat]
        unit = {"heads": heads * head_dim, "kv_heads": kv_heads * head_dim,
                "group": heads // kv_heads * head_dim, "head": head_dim}
        shares = sum(size == "share" for _, size in self.parts)
        left = out_features // repeat - sum(unit.get(size, 0) for _, size in self.parts)
        if out_features % repeat or left < 0 or (left % shares if shares else left):
            raise ValueError(f"FusedRows '{self.linear}': {out_features} rows do not split as {self.parts} x {repeat} "
                             f"with {heads} heads, {kv_heads} kv heads of {head_dim}; check the table entry")
        return repeat, tuple(unit.get(size, left // max(shares, 1)) for _, size in self.parts)


@dataclass(frozen=True)
class ConfigVariant:
    """Field changes of a family's entry for the configs it matches: every (config attribute,
    accepted values) pair of `when` holds (a missing attribute reads None)."""

    when: tuple[tuple[str, tuple[Any, ...]], ...]
    changes: tuple[tuple[str, Any], ...]  # (ArchSpec field, value)

    def matches(self, config: Any) -> bool:
        return all(getattr(config, attribute, None) in accepted for attribute, accepted in self.when)


@dataclass(frozen=True)
class Experts:
    """The experts of a mixture-of-experts MLP, stored as 3-D parameters of `module`: `gate_up`
    (experts, 2·intermediate, hidden; gate rows then up rows) and `down` (experts, hidden,
    intermediate), and its `router` (a module with a (experts, hidden) `weight`, kept in floating
    point). Its forward calls F.linear once per expert and tensor on the routed tokens (the
    transformers "eager" experts implementation)."""

    module: str
    router: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"

    @property
    def tensors(self) -> tuple[str, str]:
        """The parameter paths of the expert tensors (gate_up, down) in a block."""
        return f"{self.module}.{self.gate_up}", f"{self.module}.{self.down}"


ATTENTION_HOOKS = ("registry", "sdpa")
_FIXED_FIELDS = ("name", "model_types", "variants")  # a variant changes the block, not the entry


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its blocks, and how each block's modules group for OmniQuant."""

    name: str
    model_types: tuple[str, ...]
    backbone: str  # module whose forward(input_ids=...) embeds tokens and runs `layers`
    layers: str  # attribute of the backbone holding the nn.ModuleList of blocks
    # LET and activation quantization: attention, qkv and out (and fc1 unless the MLP reads the
    # attention's norm, its linears then in qkv), or (weight-only) none of them
    attention: str | None = None  # attention module inside a block
    qkv: NormGroup | None = None
    fc1: NormGroup | None = None
    out: LinearGroup | None = None
    fc2: tuple[str, ...] = ()
    norm_has_bias: bool = False
    # The norms multiply by (norm_weight_offset + weight): Gemma's RMSNorm by (1 + w), so a LET scale
    # s folds in as w' = (1 + w)/s - 1 (let/transforms.norm_into_linears)
    norm_weight_offset: float = 0.0
    extra_linears: tuple[str, ...] = field(default=())  # linears in no group (weight-only specs: all)
    # LET: which channels rotate together in the rotary embedding ("half": d with d + head_dim/2,
    # "interleaved": 2i with 2i+1, None: no rotary), whether a q/k scale is valid at all (not with
    # per-head q/k norms), and whether biases can absorb shifts (OPT).
    rotary_pairs: str | None = "half"
    let_qk: bool = True
    let_shifts: bool = False
    up_down: LinearGroup | None = None  # gated MLPs: the LET scale on down_proj's input (quant.let_up_down)
    fused: tuple[FusedRows, ...] = ()  # layouts of the fused linears' output rows
    # How activation quantization reaches q/k/v after the rotary embedding: "registry" (the
    # attention calls transformers' AttentionInterface) or "sdpa" (it calls torch's
    # scaled_dot_product_attention itself, as Falcon: that call is wrapped within its forward)
    attention_hook: str = "registry"
    variants: tuple[ConfigVariant, ...] = ()  # changes for the configs they match (for_config)
    experts: Experts | None = None  # mixture of experts: 3-D expert tensors (LWC per expert) and a FP router

    def __post_init__(self) -> None:
        given = [name for name in ("attention", "qkv", "out") if getattr(self, name) is not None]
        if (given or self.fc1 is not None) and len(given) < 3:
            raise ValueError(f"ArchSpec '{self.name}' gives {', '.join(given) or 'fc1'} but not all of attention, qkv, "
                             "out: give them (and fc1 unless the MLP reads the attention's norm) for LET and "
                             "activation quantization, or none (weight-only)")
        if self.attention_hook not in ATTENTION_HOOKS:
            raise ValueError(f"ArchSpec '{self.name}': attention_hook {self.attention_hook!r}; use one of "
                             f"{ATTENTION_HOOKS}")
        fields = {f.name for f in dataclasses.fields(self)} - set(_FIXED_FIELDS)
        bad = sorted({name for variant in self.variants for name, _ in variant.changes} - fields)
        if bad:
            raise ValueError(f"ArchSpec '{self.name}': variants change {bad}; a variant changes the fields "
                             f"{sorted(fields)}")
        for variant in self.variants:  # each alone gives a valid spec (this check, without variants)
            dataclasses.replace(self, **dict(variant.changes), variants=())
        if not self.linear_names:
            raise ValueError(f"ArchSpec '{self.name}' names no linears: give the groups or extra_linears")
        layouts = {fused.linear: fused.part_names for fused in self.fused}
        for group in (self.out, self.up_down):
            if group is not None and group.source_rows is not None and group.source_rows not in layouts.get(group.source, ()):
                raise ValueError(f"ArchSpec '{self.name}': {group.source} has no part '{group.source_rows}' (its "
                                 f"FusedRows parts: {layouts.get(group.source, 'none')}); add it to `fused`")
        if self.experts is not None and self.up_down is not None:
            raise ValueError(f"ArchSpec '{self.name}': up_down with experts is not supported (one scale per "
                             "expert is not implemented); set up_down None")
        unknown = sorted(set(layouts) - set(self.linear_names))
        if unknown:
            raise ValueError(f"ArchSpec '{self.name}': FusedRows for {unknown}, which are not among its linears "
                             f"{list(self.linear_names)}")

    def for_config(self, config: Any) -> ArchSpec:
        """This entry with the changes of every variant that matches `config` applied, in order (a
        later variant wins a field); the result has no variants left."""
        if not self.variants:
            return self
        matching = [variant for variant in self.variants if variant.matches(config)]
        changes = {name: value for variant in matching for name, value in variant.changes}
        return dataclasses.replace(self, **changes, variants=())

    @property
    def weight_only(self) -> bool:
        """No LET groups and no attention module: LWC only (quant.let and abits < 16 are refused)."""
        return self.qkv is None

    @property
    def expert_tensors(self) -> tuple[str, ...]:
        """The parameter paths of a block's 3-D expert tensors (none without experts)."""
        return self.experts.tensors if self.experts is not None else ()

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every nn.Linear of a block, each once: the groups' (qkv, out, fc1), then fc2 and
        extra_linears (a group's router and expert tensors are not linears: see expert_tensors)."""
        fc1 = self.fc1.linears if self.fc1 is not None else ()
        grouped = [] if self.weight_only else [*self.qkv.linears, self.out.target, *fc1]
        not_linear = {*self.expert_tensors, *([self.experts.router] if self.experts is not None else [])}
        names = [name for name in [*grouped, *self.fc2, *self.extra_linears] if name not in not_linear]
        return tuple(dict.fromkeys(names))

    @property
    def input_range_names(self) -> tuple[str, ...]:
        """Modules whose inputs LET's initialisation measures: the linears, and the router (the
        input of the experts' norm group)."""
        return (*self.linear_names, *([self.experts.router] if self.experts is not None else []))

    def weight_name(self, linear: str) -> str:
        """The parameter a group member's weight is: an expert tensor is its own path, a linear's
        (or the router's) is `<name>.weight`."""
        return linear if linear in self.expert_tensors else f"{linear}.weight"

    def fused_rows(self, linear: str) -> FusedRows | None:
        """The row layout of `linear`, if it is fused."""
        return next((fused for fused in self.fused if fused.linear == linear), None)

    def attention_rows(self, which: str) -> tuple[str, str | None]:
        """Where q ("q") or k ("k") come from: (fused linear, part) where a layout names the part,
        else (qkv.linears[0] for q, [1] for k, None: all of its rows)."""
        for fused in self.fused:
            if which in fused.part_names:
                return fused.linear, which
        return self.qkv.linears["qk".index(which)], None

    def check_block(self, block: nn.Module, index: int = 0) -> None:
        """Fail early if a block does not have the modules this table names (or has more)."""
        found = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if self.experts is not None and self.experts.module not in dict(block.named_modules()):
            raise RuntimeError(
                f"block {index} of this {self.name} model has no experts module '{self.experts.module}' (a dense MLP: "
                f"linears {sorted(found)}); models mixing dense and expert blocks (Qwen3-MoE mlp_only_layers or "
                "decoder_sparse_step > 1) are not supported yet"
            )
        missing = [n for n in self.linear_names if n not in found]
        unexpected = sorted(found - set(self.linear_names))
        params = dict(block.named_parameters())
        missing += [name for name in self.expert_tensors if name not in params or params[name].dim() != 3]
        if self.experts is not None and f"{self.experts.router}.weight" not in params:
            missing.append(self.experts.router)
        if missing or unexpected:
            raise RuntimeError(
                f"block {index} of this {self.name} model does not match the '{self.name}' adapter: "
                f"missing linears {missing}, unlisted linears {unexpected}. "
                "The installed transformers may have renamed modules; please report it."
            )
