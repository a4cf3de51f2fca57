"""Architectures as data: which linears and norms of a block form the OmniQuant groups."""
from omniquant_pl.arch.base import ArchSpec, LinearGroup, NormGroup
from omniquant_pl.arch.registry import get_arch, register_arch, supported_model_types

__all__ = [
    "ArchSpec",
    "LinearGroup",
    "NormGroup",
    "get_arch",
    "register_arch",
    "supported_model_types",
]
