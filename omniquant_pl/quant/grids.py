"""Which grid each block linear is calibrated on.

Without ``quant.gguf_type`` every linear shares the run's grid (``quant.wbits``, ``group_size``,
``symmetric``, ``grid``). With it (a llama.cpp file type such as ``Q4_K_M``), each linear is
calibrated on the GGUF type llama.cpp will store it in (gguf_mix.py): the legacy 32-weight types on
llama.cpp's own grid with groups of 32, the K-quants on their super-block grids (kquant_grid.py), IQ4_NL and IQ4_XS on their
non-uniform levels (iq4_grid.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.gguf_mix import ModelShape, linear_type

# llama.cpp's legacy 32-weight types as (bits, symmetric) on its own grid with groups of 32
LEGACY_TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
IQ4_TYPES = ("IQ4_NL", "IQ4_XS")  # 4-bit indices into 16 non-uniform levels (iq4_grid.py)


@dataclass(frozen=True)
class LinearGrid:
    """One linear's grid: bits, group size (0 = per channel), symmetry, llama.cpp's grid or min-max,
    and the GGUF type it is stored in when the run targets one."""

    bits: int
    group_size: int
    symmetric: bool
    gguf: bool
    gguf_type: str | None = None


def run_grid(quant) -> LinearGrid:
    """The grid every linear of a run without quant.gguf_type shares."""
    return LinearGrid(quant.wbits, quant.group_size, quant.symmetric, quant.grid == "gguf")


def type_grid(type_name: str) -> LinearGrid:
    """The grid of one GGUF type (a one-line error for a type no grid here reproduces)."""
    if type_name in LEGACY_TYPES:
        bits, symmetric = LEGACY_TYPES[type_name]
        return LinearGrid(bits, 32, symmetric, True, type_name)
    if type_name in K_TYPES:
        return LinearGrid(int(type_name[1]), 256, type_name in ("Q3_K", "Q6_K"), True, type_name)
    if type_name in IQ4_TYPES:
        return LinearGrid(4, 32 if type_name == "IQ4_NL" else 256, True, True, type_name)
    raise ConfigError(f"llama.cpp stores a linear of this model as {type_name}, a type no calibration grid here "
                      f"reproduces (grids: {', '.join([*LEGACY_TYPES, *K_TYPES, *IQ4_TYPES])}); choose another quant.gguf_type")


def linear_grid(quant, linear: str, block: int, in_features: int, shape: ModelShape | None) -> LinearGrid:
    """The grid of block `block`'s linear `linear` (e.g. ``mlp.down_proj``) with `in_features` inputs."""
    if getattr(quant, "gguf_type", None) is None:
        return run_grid(quant)
    if shape is None:
        raise ValueError("a run with quant.gguf_type needs the model's shape (layers, grouped-query heads)")
    return type_grid(linear_type(quant.gguf_type, linear, block, in_features, shape))


def build_quantizer(grid: LinearGrid, weight_shape: tuple[int, int], quant=None):
    """The weight quantizer of one linear on `grid`: learning what `quant` asks (LWC, rounding, weights),
    or plain round-to-nearest when `quant` is None."""
    from omniquant_pl.quant.lwc import WeightQuantizer

    learn = quant is not None
    if grid.gguf_type in K_TYPES:
        from omniquant_pl.quant.kquant_grid import KQuantizer

        return KQuantizer(weight_shape, grid.gguf_type, learnable_clipping=learn and quant.lwc,
                          learn_rounding=learn and quant.rounding, learn_weights=learn and quant.train_weights)
    if grid.gguf_type in IQ4_TYPES:
        from omniquant_pl.quant.iq4_grid import IQ4Quantizer

        return IQ4Quantizer(weight_shape, grid.gguf_type, learnable_clipping=learn and quant.lwc,
                            learn_rounding=learn and quant.rounding, learn_weights=learn and quant.train_weights)
    return WeightQuantizer(weight_shape, grid.bits, grid.group_size, grid.symmetric, gguf_grid=grid.gguf,
                           learnable_clipping=learn and quant.lwc, init=quant.lwc_init if learn else 4.0,
                           learn_rounding=learn and quant.rounding, learn_weights=learn and quant.train_weights)
