"""Orthogonal rotations folded into the weights before calibration (`quant.rotate`), so that
outlier channels of the residual stream and of the attention values are spread over all channels
before anything is quantized (QuaRot/SpinQuant's foldable part). The folded part runs nothing
online: the rotated model is an ordinary model of the same family, and with quantization off it
computes the original model's logits (float64: to 1e-9).

In column-vector notation, with Q (hidden × hidden) and H (head_dim × head_dim) orthogonal:
1. `fold_norm_gains`: each RMSNorm's gain g moves into the columns of the linears that read it,
   W ← W·diag(g), and the gain becomes 1 (the final norm's gain into the head). An RMSNorm with
   unit gain commutes with Q: ||Qᵀx|| = ||x||.
2. the residual stream x becomes Qᵀx: embedding rows E ← E·Q; every linear that reads it (q/k/v,
   gate/up, the head) W ← W·Q; every linear that writes it (o, down) W ← Qᵀ·W (bias b ← Qᵀb).
3. each value head v becomes Hᵀv: v_proj's rows of each key/value head ← Hᵀ·W_v, and o_proj's
   columns of each query head ← W_o·H (grouped-query attention: one H for every head, so the query
   heads that share a value head see the same rotation).

A tied head is untied first (the head takes the final norm's gain, the embedding does not). Offered
for the families whose block is "norm → readers, writer → residual" with RMSNorm and no fused or
expert tensors; refused in one line elsewhere, with the reason.

Online rotations (`quant.rotate_online`, weight-activation runs) are the part that cannot be folded:
a linear's input x becomes x·R right before its activation quantizer (quant/activation_hooks.py) and
the weight it quantizes W·R (quant/linear.py), so x·R·(W·R)ᵀ = x·Wᵀ; the unquantized model keeps W. ``down`` rotates down_proj's input on top of the folded
rotations; ``all`` also rotates every input read from a norm and then leaves the residual stream
and the norm gains alone (steps 1 and 2 are skipped, step 3 stays). One matrix per site, shared by
every block: `online_rotations` rebuilds them from the kind and seed (a saved model records both).
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.errors import ConfigError

log = logging.getLogger(__name__)


def check_hadamard_size(size: int) -> None:
    if size & (size - 1):
        raise ConfigError(f"quant.rotate hadamard needs power-of-two sizes, but this model has {size}; "
                          "use quant.rotate: random")


@functools.lru_cache(maxsize=8)
def orthogonal(kind: str, size: int, seed: int) -> torch.Tensor:
    """A (size, size) float64 orthogonal matrix: Haar-random (`random`) or a Hadamard matrix with
    random signs on its rows (`hadamard`, size a power of two); reproducible by `seed`. Cached: the
    caller must not modify it."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed
    check_hadamard_size(size)
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < size:  # Sylvester: [[H, H], [H, -H]]
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.unsqueeze(1) * hadamard / math.sqrt(size)


def rotation_sizes(config) -> tuple[int, int]:
    """(hidden size, head size): the sizes of the residual and value-head rotations."""
    return config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def why_not_rotatable(spec: ArchSpec, model: nn.Module) -> str | None:
    """The reason rotation is not exact for this model, or None."""
    if spec.qkv is None or spec.fc1 is None or spec.out is None or not spec.fc2:
        return f"{spec.name} is described weight-only (no norm groups)"
    if spec.norm_has_bias or spec.norm_weight_offset:
        return f"{spec.name}'s norms are not plain RMSNorms (bias or 1 + w gains)"
    if spec.fused or spec.experts is not None:
        return f"{spec.name} has fused or expert tensors, which are not rotated yet"
    backbone = model.get_submodule(spec.backbone)
    if not isinstance(getattr(backbone, "norm", None), nn.Module) or model.get_output_embeddings() is None:
        return f"{spec.name} has no final norm at {spec.backbone}.norm or no output head"
    block = getattr(backbone, spec.layers)[0]
    norms = {spec.qkv.norm, spec.fc1.norm}
    extra = [name for name, module in block.named_modules()
             if "norm" in type(module).__name__.lower() and name not in norms and "." not in name]
    if extra:
        return f"{spec.name}'s blocks have norms on the residual branch ({', '.join(extra)})"
    return None


def check_rotatable(spec: ArchSpec, model: nn.Module, kind: str, online: str = "none") -> None:
    if kind == "none":
        return
    reason = why_not_rotatable(spec, model)
    if reason is not None:
        raise ConfigError(f"quant.rotate {kind} is exact only where every residual-stream reader and writer can "
                          f"absorb it: {reason}; use quant.rotate: none for this model")
    if kind == "hadamard":
        sizes = [*rotation_sizes(model.config), *([model.config.intermediate_size] if online != "none" else [])]
        for size in sizes:
            check_hadamard_size(size)


@torch.no_grad()
def _scale_columns(linear: nn.Linear, gain: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.double() * gain.double()).to(linear.weight.dtype))


@torch.no_grad()
def fold_norm_gains(model: nn.Module, spec: ArchSpec) -> None:
    """Move every norm's gain into the linears that read it (the final norm's into the head)."""
    backbone = model.get_submodule(spec.backbone)
    for block in getattr(backbone, spec.layers):
        for group in (spec.qkv, spec.fc1):
            norm = block.get_submodule(group.norm)
            for name in group.linears:
                _scale_columns(block.get_submodule(name), norm.weight)
            norm.weight.fill_(1.0)
    untie_head(model)
    _scale_columns(model.get_output_embeddings(), backbone.norm.weight)
    backbone.norm.weight.fill_(1.0)


@torch.no_grad()
def untie_head(model: nn.Module) -> None:
    """Give the output head its own weight (a copy of the embedding's) where the two are tied."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def rotate_weight(weight: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> torch.Tensor:
    """left · weight · right in float64, back in the weight's dtype."""
    value = weight.double()
    if left is not None:
        value = left @ value
    if right is not None:
        value = value @ right
    return value.to(weight.dtype)


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ArchSpec, kind: str, seed: int = 0, online: str = "none") -> None:
    """Fold the norm gains and rotate the residual stream (not with online ``all``) and the value
    heads (see the module). The model computes the same function afterwards (up to floating-point
    rounding). The online rotations' weights W·R are made where each block is quantized (QuantLinear)."""
    if kind == "none":
        return
    check_rotatable(spec, model, kind, online)
    value = orthogonal(kind, rotation_sizes(model.config)[1], seed + 1)  # H
    for block in getattr(model.get_submodule(spec.backbone), spec.layers):
        _rotate_value_heads(block.get_submodule(spec.out.source), block.get_submodule(spec.out.target), value)
    if online != "all":
        _rotate_residual(model, spec, kind, seed)


def _rotate_residual(model: nn.Module, spec: ArchSpec, kind: str, seed: int) -> None:
    fold_norm_gains(model, spec)
    residual = orthogonal(kind, rotation_sizes(model.config)[0], seed)  # Q
    embedding = model.get_input_embeddings()
    embedding.weight.copy_(rotate_weight(embedding.weight, right=residual))
    head = model.get_output_embeddings()
    head.weight.copy_(rotate_weight(head.weight, right=residual))
    for block in getattr(model.get_submodule(spec.backbone), spec.layers):
        for name in (*spec.qkv.linears, *spec.fc1.linears):
            linear = block.get_submodule(name)
            linear.weight.copy_(rotate_weight(linear.weight, right=residual))
        for name in (spec.out.target, *spec.fc2):
            linear = block.get_submodule(name)
            linear.weight.copy_(rotate_weight(linear.weight, left=residual.T))
            if linear.bias is not None:
                linear.bias.copy_((residual.T @ linear.bias.double()).to(linear.bias.dtype))


def rotate_for_run(model: nn.Module, spec: ArchSpec, quant, streamed: bool) -> None:
    """Apply `quant.rotate` to the loaded model before calibration (a QuantConfig)."""
    if quant.rotate == "none":
        return
    if streamed:
        raise ConfigError(f"quant.rotate {quant.rotate} needs the whole model in memory, but model.streaming auto "
                          "chose to stream it; set model.streaming: off")
    online = quant.rotate_online
    rotate_model(model, spec, quant.rotate, quant.rotate_seed, online)
    log.info("rotated %s (%s, seed %d)%s", "the value heads" if online == "all" else "the residual stream and the value heads",
             quant.rotate, quant.rotate_seed, "" if online == "none" else f"; online rotations: {online}")


def online_rotations(spec: ArchSpec, kind: str, seed: int, online: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """Linear name -> the online rotation of its input (float64) in every block like `block`, for
    `online` none | down | all: down_proj's input (seed + 2) and, with ``all``, the readers of both
    norms, which share one matrix (seed + 3)."""
    rotations: dict[str, torch.Tensor] = {}
    if online in ("down", "all"):
        down = orthogonal(kind, block.get_submodule(spec.fc2[0]).in_features, seed + 2)
        rotations.update({name: down for name in spec.fc2})
    if online == "all":
        readers = orthogonal(kind, block.get_submodule(spec.qkv.linears[0]).in_features, seed + 3)
        rotations.update({name: readers for name in (*spec.qkv.linears, *spec.fc1.linears)})
    return rotations


def _rotate_value_heads(v_proj: nn.Linear, o_proj: nn.Linear, value: torch.Tensor) -> None:
    head_dim = value.shape[0]
    kv_heads, heads = v_proj.out_features // head_dim, o_proj.in_features // head_dim
    per_kv = torch.block_diag(*[value.T] * kv_heads)  # (kv_heads·head_dim,)²: Hᵀ per value head
    per_query = torch.block_diag(*[value] * heads)  # (heads·head_dim,)²: H per query head
    v_proj.weight.copy_(rotate_weight(v_proj.weight, left=per_kv))
    if v_proj.bias is not None:
        v_proj.bias.copy_((per_kv @ v_proj.bias.double()).to(v_proj.bias.dtype))
    o_proj.weight.copy_(rotate_weight(o_proj.weight, right=per_query))
