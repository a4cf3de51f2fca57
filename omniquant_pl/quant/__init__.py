"""Fake quantization: uniform affine grids, learnable weight clipping, per-token activations."""
from omniquant_pl.quant.act import PerTokenActQuantizer
from omniquant_pl.quant.linear import QuantLinear, quantize_block_linears, restore_block_linears
from omniquant_pl.quant.lwc import WeightQuantizer
from omniquant_pl.quant.primitives import QuantGrid, fake_quantize, round_ste

__all__ = [
    "PerTokenActQuantizer",
    "QuantGrid",
    "QuantLinear",
    "WeightQuantizer",
    "fake_quantize",
    "quantize_block_linears",
    "restore_block_linears",
    "round_ste",
]
