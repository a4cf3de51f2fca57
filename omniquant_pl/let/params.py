"""A block's LET parameters and the mapping from them to transformed block parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.let import transforms


@dataclass(frozen=True)
class AttentionGeometry:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, block: nn.Module, spec: ArchSpec) -> AttentionGeometry:
        attention = block.get_submodule(spec.attention)
        head_dim = int(attention.head_dim)
        q_out = block.get_submodule(spec.qkv.linears[0]).out_features
        k_out = block.get_submodule(spec.qkv.linears[1]).out_features
        return cls(q_out // head_dim, k_out // head_dim, head_dim)


class LETParams(nn.Module):
    """Scales (and, where biases absorb them, shifts) of one block, initialised to identity.

    qkv_scale/fc1_scale: (hidden,) on the norm outputs; out_scale: (kv_heads·head_dim,) on v's
    outputs; qk_param: (kv_heads, head_dim/2) with rotary embeddings, else (kv_heads, head_dim);
    down_scale: (intermediate,) on up's outputs = down's inputs, for gated MLPs (spec.up_down).
    """

    def __init__(self, block: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.geometry = geometry = AttentionGeometry.of(block, spec)
        hidden = block.get_submodule(spec.qkv.linears[0]).in_features
        kv_channels = geometry.kv_heads * geometry.head_dim
        self.qkv_scale = nn.Parameter(torch.ones(hidden))
        self.fc1_scale = nn.Parameter(torch.ones(hidden))
        self.out_scale = nn.Parameter(torch.ones(kv_channels))
        qk_width = geometry.head_dim // 2 if spec.rotary_pairs else geometry.head_dim
        self.qk_param = nn.Parameter(torch.ones(geometry.kv_heads, qk_width)) if spec.let_qk else None
        self.down_scale = None
        if spec.up_down is not None:
            self.down_scale = nn.Parameter(torch.ones(block.get_submodule(spec.up_down.source).out_features))
        if spec.let_shifts:
            self.qkv_shift = nn.Parameter(torch.zeros(hidden))
            self.fc1_shift = nn.Parameter(torch.zeros(hidden))
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

    def transformed(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block parameters after all LET transforms, by their names in `block`."""
        spec, geo = self.spec, self.geometry
        current = dict(block.named_parameters())

        def get(name: str) -> torch.Tensor | None:
            return current.get(name)

        out: dict[str, torch.Tensor] = {}

        def put(name: str, value: torch.Tensor | None) -> None:
            if value is not None:
                out[name] = value
                current[name] = value

        guarded = transforms.guarded_scale
        for group, scale, shift in ((spec.qkv, self.qkv_scale, self.qkv_shift), (spec.fc1, self.fc1_scale, self.fc1_shift)):
            norm_w, norm_b, weights, biases = transforms.norm_into_linears(
                get(f"{group.norm}.weight"), get(f"{group.norm}.bias"),
                [get(f"{n}.weight") for n in group.linears], [get(f"{n}.bias") for n in group.linears],
                guarded(scale), shift,
            )
            put(f"{group.norm}.weight", norm_w)
            put(f"{group.norm}.bias", norm_b)
            for name, w, b in zip(group.linears, weights, biases):
                put(f"{name}.weight", w)
                put(f"{name}.bias", b)

        src, dst = spec.out.source, spec.out.target
        sw, sb, tw, tb = transforms.linear_into_linear(
            get(f"{src}.weight"), get(f"{src}.bias"), get(f"{dst}.weight"), get(f"{dst}.bias"),
            guarded(self.out_scale), self.out_shift, geo.kv_heads, geo.groups,
        )
        put(f"{src}.weight", sw)
        put(f"{src}.bias", sb)
        put(f"{dst}.weight", tw)
        put(f"{dst}.bias", tb)

        if self.down_scale is not None:  # up -> down: the same transform with one "head"
            src, dst = spec.up_down.source, spec.up_down.target
            sw, sb, tw, tb = transforms.linear_into_linear(
                get(f"{src}.weight"), get(f"{src}.bias"), get(f"{dst}.weight"), get(f"{dst}.bias"),
                guarded(self.down_scale), None, 1, 1,
            )
            put(f"{src}.weight", sw)
            put(f"{src}.bias", sb)
            put(f"{dst}.weight", tw)
            put(f"{dst}.bias", tb)

        if self.qk_param is not None:
            q, k = spec.qkv.linears[0], spec.qkv.linears[1]
            channel_scale = transforms.qk_channel_scale(guarded(self.qk_param), spec.rotary_pairs)
            qw, qb, kw, kb = transforms.qk_scale(
                get(f"{q}.weight"), get(f"{q}.bias"), get(f"{k}.weight"), get(f"{k}.bias"), channel_scale, geo.groups
            )
            put(f"{q}.weight", qw)
            put(f"{q}.bias", qb)
            put(f"{k}.weight", kw)
            put(f"{k}.bias", kb)
        return out

    @torch.no_grad()
    def fold_into(self, block: nn.Module, transformed: dict[str, torch.Tensor] | None = None) -> None:
        """Write the transformed parameters (`transformed(block)` unless given) into `block` in
        place; the block keeps its structure."""
        params = dict(block.named_parameters())
        for name, value in (self.transformed(block) if transformed is None else transformed).items():
            params[name].copy_(value)
