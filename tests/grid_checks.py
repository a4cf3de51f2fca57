"""Checks the llama.cpp-grid tests (test_kquant_grid, test_iq4_grid) share: libggml's own quantizer,
gguf-py's de-quantizer, awkward rows, and training that must stay on the stored grid."""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def libggml(function: str):
    """A function of the installed llama-cpp-python's libggml-base (llama.cpp's own quantizers)."""
    import llama_cpp

    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    return getattr(library, function)


def decoded(packed: np.ndarray, type_name: str) -> torch.Tensor:
    """What gguf-py's de-quantizer reads from the packed bytes."""
    import gguf
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(packed, getattr(gguf.GGMLQuantizationType, type_name)).copy())


def awkward_rows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(8, 512, generator=g) / torch.rand(8, 512, generator=g).clamp_min(0.02)  # a few 50x outliers
    return {
        "normal": torch.randn(8, 512, generator=g), "heavy-tailed": heavy,
        "bf16-valued": torch.randn(8, 512, generator=g).bfloat16().float(),
        "ties": torch.randint(-8, 8, (8, 512), generator=g).float() * 0.25,
        "all-positive": torch.rand(8, 512, generator=g), "all-negative": -torch.rand(8, 512, generator=g),
        "zeros": torch.zeros(8, 512), "one-outlier": torch.zeros(8, 512).index_fill_(1, torch.tensor([3]), 5.0),
        "constant": torch.full((8, 512), 0.3), "fp16-subnormal-factors": torch.randn(8, 512, generator=g) * 1e-4,
    }


def check_training_stays_on_the_grid(make: Callable[..., torch.nn.Module], pack: Callable, type_name: str):
    """Train `make(shape, type_name, learn_rounding=True)`'s LWC and rounding against an output error with
    outlier channels: identity at init, finite gradients, a lower error than RTN, codes that are the
    forward's values and the file's, and RTN back after disable_clipping. Returns the trained codes."""
    torch.manual_seed(0)
    x = torch.randn(16, 512)
    inputs = torch.randn(64, 512) * torch.rand(512).pow(4) * 4  # activations with outlier channels

    def output_error(weight: torch.Tensor) -> torch.Tensor:  # what a block loss sees, unlike llama.cpp's search
        return ((inputs @ (weight - x).T) ** 2).mean()

    quantizer = make(tuple(x.shape), type_name, learn_rounding=True)
    rtn = quantizer(x).detach()
    assert torch.equal(rtn, make(tuple(x.shape), type_name, learnable_clipping=False)(x))  # identity at init
    optimizer = torch.optim.Adam([{"params": quantizer.freedom_parameters("lwc"), "lr": 0.01},
                                  {"params": quantizer.freedom_parameters("rounding"), "lr": 0.002}])
    for _ in range(60):
        loss = output_error(quantizer(x))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in quantizer.freedom_parameters())
        optimizer.step()
    trained = quantizer(x).detach()
    assert output_error(trained) < 0.95 * output_error(rtn)  # it learned something (K-quants: 0.71 to 0.87 of RTN)
    weight = quantizer.quantize(x)
    assert not weight.problems()
    assert torch.equal(weight.dequantize(), trained)  # the codes are the forward's values
    assert torch.equal(decoded(pack(type_name, weight), type_name), trained)  # and the file's
    quantizer.disable_clipping()
    assert torch.equal(quantizer(x), rtn)
    return weight
