"""llama.cpp's IQ4_NL and IQ4_XS: RTN equals llama.cpp's own quantizer byte for byte, and training moves
the stored levels and scales while staying on the grid llama.cpp stores. (A run calibrated for these
file types, exported and scored in llama.cpp: tests/test_kquant_grid.py.)"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from grid_checks import awkward_rows, check_training_stays_on_the_grid, decoded, libggml

from omniquant_pl.quant.iq4_grid import BLOCK_BYTES, IQ4_TYPES, LEVELS, IQ4Quantizer, best_index, pack_iq4

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")


def _reference(x: torch.Tensor, type_name: str) -> np.ndarray:
    """llama.cpp's own bytes: quantize_iq4_nl / quantize_iq4_xs (what llama-quantize calls) from libggml-base."""
    function = libggml(f"quantize_{type_name.lower()}")
    function.restype = ctypes.c_size_t
    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    per_block = 32 if type_name == "IQ4_NL" else 256
    out = np.zeros(data.size // per_block * BLOCK_BYTES[type_name], dtype=np.uint8)
    function(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.shape[0]),
             ctypes.c_int64(x.shape[1]), None)
    return out.reshape(x.shape[0], -1)


def test_best_index_is_llama_cpps_nearest_level_with_ties_going_up():
    levels = torch.tensor(LEVELS, dtype=torch.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2
    a = torch.cat([levels, midpoints, midpoints - 0.25, torch.tensor([-500.0, 500.0, float("inf"), -float("inf")])])
    expected = torch.cat([torch.arange(16), torch.arange(1, 16), torch.arange(15), torch.tensor([0, 15, 15, 0])])
    assert torch.equal(best_index(a), expected)


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_rtn_is_llama_cpps_quantizer_byte_for_byte(type_name):
    for name, x in awkward_rows().items():
        weight = IQ4Quantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
        packed = pack_iq4(type_name, weight)
        assert np.array_equal(packed, _reference(x, type_name)), name
        assert torch.equal(decoded(packed, type_name), weight.dequantize()), name


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_values_below_fp16_equal_llama_cpps(type_name):
    """Scales that fp16 rounds to (signed) zero: the same all-zero values as llama.cpp's file."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 1e-6
    weight = IQ4Quantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
    assert torch.equal(decoded(pack_iq4(type_name, weight), type_name), decoded(_reference(x, type_name), type_name))


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_training_moves_the_stored_levels_and_stays_on_the_grid(type_name):
    weight = check_training_stays_on_the_grid(IQ4Quantizer, pack_iq4, type_name)
    assert set(weight.codes.unique().tolist()) <= set(LEVELS)


def test_rows_the_block_does_not_divide_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        IQ4Quantizer((4, 576), "IQ4_XS")
    assert IQ4Quantizer((4, 576), "IQ4_NL", learnable_clipping=False)(torch.randn(4, 576)).shape == (4, 576)
