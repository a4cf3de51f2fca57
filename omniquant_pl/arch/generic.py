"""A weight-only ArchSpec found on the model itself, for causal LMs with no table entry.

The decoder blocks are the longest nn.ModuleList under the model's base model whose children all
have one class and hold nn.Linear modules (lists nested inside such a block, e.g. MoE experts,
are not candidates); the backbone is the module holding that list, which must take `input_ids`.
Every nn.Linear of a block is quantized with LWC, in definition order. LET and activation
quantization need the groups and the attention module that only a table entry names.
"""
from __future__ import annotations

import inspect

from torch import nn

from omniquant_pl.arch.base import ArchSpec


class NoBlocksFound(Exception):
    """The model has no decoder-block list this module can describe (the reason is the message)."""


def block_linears(block: nn.Module) -> tuple[str, ...]:
    """Names of a block's nn.Linear modules, in definition order."""
    return tuple(name for name, module in block.named_modules() if isinstance(module, nn.Linear))


def _is_block_list(modules: nn.Module) -> bool:
    """A non-empty ModuleList of one class whose first child holds nn.Linear modules."""
    if not isinstance(modules, nn.ModuleList) or len(modules) == 0:
        return False
    return len({type(child) for child in modules}) == 1 and bool(block_linears(modules[0]))


def find_block_list(model: nn.Module) -> str:
    """Path (from `model`) of the decoder blocks' ModuleList; raises NoBlocksFound."""
    prefix = getattr(model, "base_model_prefix", "")
    root = prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
    base = model.get_submodule(root)
    candidates = [name for name, module in base.named_modules() if name and _is_block_list(module)]
    outermost = [name for name in candidates if not any(name.startswith(f"{other}.") for other in candidates)]
    if not outermost:
        raise NoBlocksFound(f"no nn.ModuleList of blocks holding nn.Linear layers under its base model "
                            f"('{root or type(model).__name__}')")
    name = max(outermost, key=lambda n: len(base.get_submodule(n)))  # the first of the longest
    return f"{root}.{name}" if root else name


def _check_same_linears(blocks: nn.ModuleList, path: str) -> tuple[str, ...]:
    names = block_linears(blocks[0])
    for index, block in enumerate(blocks):
        if block_linears(block) != names:
            raise NoBlocksFound(f"the blocks of {path} differ: block 0 has linears {list(names)}, block {index} "
                                f"has {list(block_linears(block))}")
    return names


def generic_spec(model: nn.Module) -> ArchSpec:
    """The weight-only ArchSpec of `model`: its decoder blocks and each block's linears."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    path = find_block_list(model)
    backbone, _, layers = path.rpartition(".")
    if "input_ids" not in inspect.signature(model.get_submodule(backbone).forward).parameters:
        raise NoBlocksFound(f"the module holding its blocks ({backbone or 'the model'}) takes no input_ids")
    linears = _check_same_linears(model.get_submodule(path), path)
    return ArchSpec(name=model_type, model_types=(model_type,), backbone=backbone, layers=layers,
                    extra_linears=linears, rotary_pairs=None, let_qk=False)
