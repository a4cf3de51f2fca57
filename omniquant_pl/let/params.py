"""A block's LET parameters and the mapping from them to transformed block parameters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec, LinearGroup, NormGroup
from omniquant_pl.let import transforms
from omniquant_pl.let.rows import replace_rows, take_rows


def _rotary_dim(config, head_dim: int) -> int:
    """Channels per head that rotary embeddings rotate: the first head_dim·partial_rotary_factor
    (Phi-4-mini: 0.75); the rest pass through unrotated."""
    rope = getattr(config, "rope_parameters", None)
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * factor)


def _first_attribute(objects, names: tuple[str, ...]):
    """The first of `names` set (not None) on the first of `objects` that has one; None if none."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return None


@dataclass(frozen=True)
class AttentionGeometry:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int = 0  # leading channels of each head that rotate (0: no rotary embedding)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, block: nn.Module, spec: ArchSpec) -> AttentionGeometry:
        """Heads from q's and k's widths (separate projections), else from the attention module or
        its config (fused ones; FusedRows.sizes then checks they split the rows)."""
        attention = block.get_submodule(spec.attention)
        config = getattr(attention, "config", None)
        head_dim = int(attention.head_dim)
        (q, q_part), (k, k_part) = spec.attention_rows("q"), spec.attention_rows("k")
        if q_part is None and k_part is None:
            heads = block.get_submodule(q).out_features // head_dim
            kv_heads = block.get_submodule(k).out_features // head_dim
        else:  # the attention module's own counts first (Falcon-7B's config misstates its kv heads)
            heads = int(_first_attribute((attention, config), ("num_heads", "num_attention_heads")))
            kv_heads = int(_first_attribute((attention, config), ("num_key_value_heads", "num_kv_heads")) or heads)
        rotary_dim = _rotary_dim(config, head_dim) if spec.rotary_pairs else 0
        return cls(heads, kv_heads, head_dim, rotary_dim)


class _BlockParams:
    """The block's parameters as the transforms rewrite them (the latest value of each, and which
    changed); a part of a fused linear's rows is read and written through its FusedRows layout."""

    def __init__(self, block: nn.Module, spec: ArchSpec, geometry: AttentionGeometry) -> None:
        self.current = dict(block.named_parameters())
        self.changed: dict[str, torch.Tensor] = {}
        self.spec, self.geometry = spec, geometry

    def get(self, name: str) -> torch.Tensor | None:
        return self.current.get(name)

    def put(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.changed[name] = self.current[name] = value

    def rows(self, linear: str, part: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of `linear`, or of the rows of one `part` of it."""
        weight, bias = self.get(self.spec.weight_name(linear)), self.get(f"{linear}.bias")
        if part is None:
            return weight, bias
        layout = self.spec.fused_rows(linear)
        return (take_rows(weight, layout, part, self.geometry),
                None if bias is None else take_rows(bias, layout, part, self.geometry))

    def put_rows(self, linear: str, part: str | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if part is not None:
            layout = self.spec.fused_rows(linear)
            weight = replace_rows(self.get(self.spec.weight_name(linear)), layout, part, weight, self.geometry)
            if bias is not None:
                bias = replace_rows(self.get(f"{linear}.bias"), layout, part, bias, self.geometry)
        self.put(self.spec.weight_name(linear), weight)
        self.put(f"{linear}.bias", bias)


class LETParams(nn.Module):
    """Scales (and, where biases absorb them, shifts) of one block, initialised to identity.

    qkv_scale/fc1_scale: (hidden,) on the norm outputs (no fc1_scale where the MLP reads the
    attention's norm: spec.fc1 None); out_scale: (kv_heads·head_dim,) on v's
    outputs; qk_param: (kv_heads, rotary_dim/2 + head_dim - rotary_dim) with rotary embeddings (one
    value per rotating pair, one per unrotated channel), else (kv_heads, head_dim); down_scale:
    (intermediate,) on up's outputs = down's inputs, for gated MLPs (spec.up_down). A mixture of
    experts' fc1 group holds the router and the 3-D gate_up tensor: fc1_scale multiplies the input
    columns (last dimension) of both, for every expert.
    """

    def __init__(self, block: nn.Module, spec: ArchSpec, norm_scales: bool = True) -> None:
        """`norm_scales` False: no norm -> linears pair (their inputs are rotated online)."""
        super().__init__()
        self.spec = spec
        self.geometry = geometry = AttentionGeometry.of(block, spec)
        hidden = block.get_submodule(spec.qkv.linears[0]).in_features
        kv_channels = geometry.kv_heads * geometry.head_dim
        self.qkv_scale = nn.Parameter(torch.ones(hidden)) if norm_scales else None
        self.fc1_scale = nn.Parameter(torch.ones(hidden)) if spec.fc1 is not None and norm_scales else None
        self.out_scale = nn.Parameter(torch.ones(kv_channels))
        qk_width = geometry.head_dim - geometry.rotary_dim // 2
        self.qk_param = nn.Parameter(torch.ones(geometry.kv_heads, qk_width)) if spec.let_qk else None
        self.down_scale = None
        if spec.up_down is not None:  # down's input columns = up's output rows
            self.down_scale = nn.Parameter(torch.ones(block.get_submodule(spec.up_down.target).in_features))
        if spec.let_shifts:
            self.qkv_shift = nn.Parameter(torch.zeros(hidden)) if norm_scales else None
            self.fc1_shift = nn.Parameter(torch.zeros(hidden)) if self.fc1_scale is not None else None
            self.out_shift = nn.Parameter(torch.zeros(kv_channels))
        else:
            self.qkv_shift = self.fc1_shift = self.out_shift = None

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Scales 1 and shifts 0: every transform leaves the block's parameters exactly as they are."""
        for scale in (self.qkv_scale, self.fc1_scale, self.out_scale, self.qk_param, self.down_scale):
            if scale is not None:
                scale.fill_(1.0)
        for shift in (self.qkv_shift, self.fc1_shift, self.out_shift):
            if shift is not None:
                shift.zero_()

    def norm_groups(self) -> list[tuple[NormGroup, nn.Parameter, nn.Parameter | None]]:
        """(group, scale, shift) of each norm -> linears group: qkv, and fc1 where the block has it."""
        groups = [(self.spec.qkv, self.qkv_scale, self.qkv_shift), (self.spec.fc1, self.fc1_scale, self.fc1_shift)]
        return [group for group in groups if group[0] is not None and group[1] is not None]

    @classmethod
    def for_run(cls, block: nn.Module, spec: ArchSpec, quant) -> LETParams:
        """The pairs a run learns (a QuantConfig): up -> down with quant.let_up_down; none whose
        input quant.rotate_online rotates (the scale would sit between the rotation and the quantizer)."""
        up_down = spec.up_down if quant.let_up_down and quant.rotate_online == "none" else None
        return cls(block, dataclasses.replace(spec, up_down=up_down), norm_scales=quant.rotate_online != "all")

    def transformed(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block parameters after all LET transforms, by their names in `block`."""
        spec, geo = self.spec, self.geometry
        params = _BlockParams(block, spec, geo)
        guarded = transforms.guarded_scale
        for group, scale, shift in self.norm_groups():
            norm_w, norm_b, weights, biases = transforms.norm_into_linears(
                params.get(f"{group.norm}.weight"), params.get(f"{group.norm}.bias"),
                [params.get(spec.weight_name(n)) for n in group.linears], [params.get(f"{n}.bias") for n in group.linears],
                guarded(scale), shift, spec.norm_weight_offset,
            )
            params.put(f"{group.norm}.weight", norm_w)
            params.put(f"{group.norm}.bias", norm_b)
            for name, w, b in zip(group.linears, weights, biases):
                params.put_rows(name, None, w, b)
        self._linear_into_linear(params, spec.out, guarded(self.out_scale), self.out_shift, geo.kv_heads, geo.groups)
        if self.down_scale is not None:  # up -> down: the same transform with one "head"
            self._linear_into_linear(params, spec.up_down, guarded(self.down_scale), None, 1, 1)
        if self.qk_param is not None:
            (q, q_part), (k, k_part) = spec.attention_rows("q"), spec.attention_rows("k")
            channel_scale = transforms.qk_channel_scale(guarded(self.qk_param), spec.rotary_pairs, geo.rotary_dim)
            qw, qb, kw, kb = transforms.qk_scale(*params.rows(q, q_part), *params.rows(k, k_part), channel_scale, geo.groups)
            params.put_rows(q, q_part, qw, qb)
            params.put_rows(k, k_part, kw, kb)
        return params.changed

    @staticmethod
    def _linear_into_linear(params: _BlockParams, group: LinearGroup, scale: torch.Tensor, shift: torch.Tensor | None,
                            kv_heads: int, groups: int) -> None:
        sw, sb = params.rows(group.source, group.source_rows)
        tw, tb = params.rows(group.target, None)
        sw, sb, tw, tb = transforms.linear_into_linear(sw, sb, tw, tb, scale, shift, kv_heads, groups)
        params.put_rows(group.source, group.source_rows, sw, sb)
        params.put_rows(group.target, None, tw, tb)

    @torch.no_grad()
    def fold_into(self, block: nn.Module, transformed: dict[str, torch.Tensor] | None = None) -> None:
        """Write the transformed parameters (`transformed(block)` unless given) into `block` in
        place; the block keeps its structure."""
        params = dict(block.named_parameters())
        for name, value in (self.transformed(block) if transformed is None else transformed).items():
            params[name].copy_(value)
