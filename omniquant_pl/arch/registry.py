"""Registry of architecture adapters keyed by `config.model_type`."""
from __future__ import annotations

from torch import nn

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.tables import BUILTIN_ARCHS
from omniquant_pl.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> None:
    """Make `spec` the adapter for each of its model types (later registrations win)."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """The adapter for a model (or a `model_type` string); a one-line error if there is none."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    spec = _REGISTRY.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': supported model types are "
            f"{', '.join(supported_model_types())}. Add an ArchSpec to omniquant_pl/arch/tables.py "
            "(or call omniquant_pl.arch.register_arch) to support it."
        )
    return spec


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.backbone).get_submodule(spec.layers)


for _spec in BUILTIN_ARCHS:
    register_arch(_spec)
