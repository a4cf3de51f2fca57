"""The learned integers as data: codes/scale/zero point equal the fake-quant values, fusing writes them."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_BUILDERS

from omniquant_pl import QuantConfig, TrainConfig
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import capture_block_inputs, run_block
from omniquant_pl.quant import WeightQuantizer
from omniquant_pl.quant.activation_hooks import use_quantized_attention
from omniquant_pl.quant.codes import QuantizedWeight, load_block_codes, save_block_codes


def _clipped_quantizer(shape, bits, group_size, symmetric, seed=0, gguf_grid=False):
    torch.manual_seed(seed)
    quantizer = WeightQuantizer(shape, bits, group_size, symmetric, gguf_grid=gguf_grid)
    with torch.no_grad():
        quantizer.upper_logit.uniform_(-1, 5)
        quantizer.lower_logit.uniform_(-1, 5)
    return quantizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gguf_grid", [False, True])
def test_codes_dequantize_to_the_fake_quant_weight_bit_for_bit(bits, symmetric, group_size, dtype, gguf_grid):
    quantizer = _clipped_quantizer((24, 64), bits, group_size, symmetric, seed=bits, gguf_grid=gguf_grid)
    weight = (torch.randn(24, 64) * torch.rand(24, 1) * 3).to(dtype)
    codes = quantizer.quantize(weight)
    assert codes.codes.shape == (24, 64) and codes.scale.shape == (24, 64 // (group_size or 64))
    assert codes.group_size == (group_size or 64) and codes.bits == bits and codes.symmetric == symmetric
    grid = quantizer.grid
    qmin, qmax = grid.qmin, grid.qmax
    assert qmax == (2 ** (bits - 1) - 1 if symmetric else 2**bits - 1)
    assert int(codes.codes.max()) <= qmax and int(codes.codes.min()) >= qmin
    if grid.rule == "gguf_sym":  # all 2^b levels, negative scales where the positive extreme is larger
        assert qmin == -qmax - 1 and int(codes.codes.min()) == qmin
        assert (codes.scale < 0).any() and (codes.scale > 0).any()
    if gguf_grid:  # llama.cpp stores d (and m) in fp16: the grid's values use exactly those
        assert torch.equal(codes.scale.half().float(), codes.scale)
    if not symmetric and not gguf_grid:
        assert codes.zero.dtype == torch.uint8 and int(codes.zero.max()) <= qmax and codes.minimum is None
    if not symmetric and gguf_grid:  # a real-valued minimum instead of an integer zero point
        assert codes.zero is None and codes.minimum.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(codes.dequantize(dtype), quantizer(weight))


def test_one_signed_rows_keep_their_zero_point_on_the_grid():
    """An all-positive (or all-negative) row's range is widened to include 0: its zero point is an
    integer in [0, 2^b - 1] (the official min-max grid would put it at -4 here), and its values stay
    within half a step of the weights."""
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.5], [-0.9, -0.5, -0.4, -0.2], [-0.3, 0.0, 0.5, 1.2]])
    codes = WeightQuantizer((3, 4), 4, learnable_clipping=False).quantize(weight)
    assert codes.zero.tolist() == [[0], [15], [3]]
    step = torch.tensor([0.5 / 15, 0.9 / 15, 1.5 / 15]).unsqueeze(1)
    assert torch.all((codes.dequantize() - weight).abs() <= step / 2 + 1e-7)


def test_codes_round_trip_through_the_block_file(tmp_path):
    weights = {
        "self_attn.q_proj": _clipped_quantizer((16, 32), 4, 16, False).quantize(torch.randn(16, 32)),
        "mlp.down_proj": _clipped_quantizer((8, 32), 3, 0, True).quantize(torch.randn(8, 32)),
        "mlp.up_proj": _clipped_quantizer((8, 32), 4, 16, False, gguf_grid=True).quantize(torch.randn(8, 32)),
    }
    save_block_codes(tmp_path, 3, weights)
    loaded = load_block_codes(tmp_path, 3)
    assert loaded.keys() == weights.keys()
    for name, weight in weights.items():
        assert loaded[name].bits == weight.bits and loaded[name].symmetric == weight.symmetric
        assert torch.equal(loaded[name].dequantize(), weight.dequantize())
        assert torch.equal(loaded[name].codes, weight.codes)


def _block_module(family, quant, dtype=torch.float32):
    model = TINY_BUILDERS[family]().to(dtype)
    if quant.abits < 16:  # what the sequencer does for activation quantization
        use_quantized_attention(model)
    spec = get_arch(model)
    windows = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, spec, windows)
    block = get_blocks(model, spec)[0]
    module = BlockModule(block, 0, spec, captured.block_kwargs, quant, TrainConfig())
    with torch.no_grad():
        for param in module.lwc_parameters():
            param.uniform_(-1, 5)
        if module.let is not None:
            for name, param in module.let.named_parameters():
                param.copy_(torch.rand_like(param) + 0.5 if "shift" not in name else torch.randn_like(param) * 0.1)
    return module, captured


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_fused_linears_hold_exactly_the_codes_and_fusing_twice_changes_nothing(family):
    module, captured = _block_module(family, QuantConfig(wbits=4, abits=8, group_size=16, let=True))
    with torch.no_grad():
        fake_quant = module(captured.hidden_states)
        block = module.fuse()
        fused_state = {k: v.clone() for k, v in block.state_dict().items()}
        assert module.fuse() is block  # a second fuse (a user callback, say) is a no-op
    assert all(torch.equal(v, fused_state[k]) for k, v in block.state_dict().items())
    assert set(module.quantized_weights) == set(module.spec.linear_names)
    for name, codes in module.quantized_weights.items():
        assert torch.equal(block.get_submodule(name).weight, codes.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(run_block(block, captured.hidden_states, captured.block_kwargs), fake_quant)


def test_fuse_quantizes_the_fp32_let_transformed_weight_of_a_bf16_block():
    """Training quantizes W·s in fp32 (bf16 weight times fp32 scale); fusing must quantize that
    same value, not its bf16 rounding, and store the dequantized codes in bf16."""
    module, _ = _block_module("llama", QuantConfig(wbits=4, abits=8, group_size=16, let=True), torch.bfloat16)
    with torch.no_grad():
        transformed = module.let.transformed(module.block)
        expected = {name: linear.weight_quantizer.quantize(transformed.get(f"{name}.weight", linear.weight))
                    for name, linear in module.quant_linears.items()}
        assert transformed["self_attn.q_proj.weight"].dtype == torch.float32
        block = module.fuse()
    for name, codes in expected.items():
        assert torch.equal(module.quantized_weights[name].codes, codes.codes)
        assert torch.equal(block.get_submodule(name).weight, codes.dequantize(torch.bfloat16))


def test_quantized_weight_group_geometry():
    codes = QuantizedWeight(torch.arange(8, dtype=torch.uint8).view(2, 4), torch.tensor([[1.0, 2.0], [0.5, 0.25]]),
                            torch.tensor([[1, 2], [3, 0]], dtype=torch.uint8), bits=3)
    assert codes.group_size == 2
    assert codes.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0], [0.5, 1.0, 1.5, 1.75]]
