"""Registry of architecture adapters keyed by `config.model_type`, with a generic weight-only
fallback (arch/generic.py) for causal LMs that have no entry."""
from __future__ import annotations

import logging

import torch
from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.generic import NoBlocksFound, generic_spec
from omniquant_pl.arch.tables import BUILTIN_ARCHS
from omniquant_pl.errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)

_REGISTRY: dict[str, ArchSpec] = {}
TABLES = "omniquant_pl/arch/tables.py"


def register_arch(spec: ArchSpec) -> None:
    """Make `spec` the adapter for each of its model types (later registrations win)."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _unsupported(model_type: str | None, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"unsupported architecture '{model_type}': {reason}; supported model types are "
        f"{', '.join(supported_model_types())}. Add an ArchSpec to {TABLES} "
        "(or call omniquant_pl.arch.register_arch) to support it."
    )


def get_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """The adapter for a model (or a `model_type` string): its table entry (resolved for the
    model's config: ArchSpec.for_config; a string gives the entry as written), else (a model only)
    a weight-only spec found on the model itself; a one-line error if neither exists."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    spec = _REGISTRY.get(model_type or "")
    if spec is not None:
        return spec if isinstance(model_or_type, str) else spec.for_config(model_or_type.config)
    if isinstance(model_or_type, str):
        raise _unsupported(model_type, "it has no table entry (a model, not its type, can be described generically)")
    try:
        return generic_spec(model_or_type)
    except NoBlocksFound as err:
        raise _unsupported(model_type, f"it has no table entry and cannot be quantized generically ({err})") from None


def get_arch_for_config(config) -> ArchSpec:
    """The adapter for a transformers config: its table entry (resolved for it), or the generic
    spec of a weightless model built from it on the meta device."""
    if config.model_type in _REGISTRY:
        return _REGISTRY[config.model_type].for_config(config)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return get_arch(skeleton)


def check_supported(spec: ArchSpec, let: bool, abits: int) -> None:
    """LET and activation quantization need a table entry: refuse them for a weight-only spec."""
    asked = [option for option, on in (("quant.let true", let), (f"quant.abits {abits}", abits < 16)) if on]
    if spec.weight_only and asked:
        raise UnsupportedArchitectureError(
            f"{' and '.join(asked)}: '{spec.name}' has no entry in {TABLES}, so it is quantized weight-only (LWC on "
            f"every linear of its blocks); LET and activation quantization support the model types "
            f"{', '.join(supported_model_types())}. Use --quant.let false --quant.abits 16, or add an ArchSpec "
            f"for '{spec.name}' to {TABLES}"
        )


def warn_if_weight_only(spec: ArchSpec, num_blocks: int) -> None:
    """Say (once per run: the sequencer calls it) that a model without a table entry is weight-only."""
    if spec.weight_only:
        log.warning("'%s' has no entry in %s: quantizing weight-only, LWC on the %d linears of each of its %d "
                    "blocks (%s.%s: %s); LET and activation quantization need a table entry in %s",
                    spec.name, TABLES, len(spec.linear_names), num_blocks, spec.backbone or "model", spec.layers,
                    ", ".join(spec.linear_names), TABLES)


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.backbone).get_submodule(spec.layers)


for _spec in BUILTIN_ARCHS:
    register_arch(_spec)
