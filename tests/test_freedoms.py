"""Learned freedoms beyond the paper (quant/freedoms.py): rounding offsets and weight deltas.

Each must: receive gradients; leave the block exactly LWC's at zero (and RTN's under make_rtn);
fuse to what the fake-quant block computes; store codes whose values are the forward's bit for bit
(so every exporter writes the learned integers); and resume to the uninterrupted result."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_BUILDERS, tiny_llama
from family_checks import check_cut_and_resume, tiny_run_config

from omniquant_pl import QuantConfig, TrainConfig, calibrate
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import capture_block_inputs, run_block
from omniquant_pl.quant import WeightQuantizer
from omniquant_pl.quant.activation_hooks import use_quantized_attention
from omniquant_pl.quant.grids import build_quantizer, type_grid

FREEDOMS = {"rounding": {"rounding": True}, "weights": {"train_weights": True},
            "both": {"rounding": True, "train_weights": True}}
GRIDS = {"minmax-asym": {}, "minmax-sym": {"symmetric": True}, "gguf-q4_0": {"symmetric": True, "grid": "gguf"},
         "gguf-q4_1": {"grid": "gguf"}}


def _quantizer(grid: dict, **freedoms) -> WeightQuantizer:
    return WeightQuantizer((24, 64), 4, 32, grid.get("symmetric", False), gguf_grid=grid.get("grid") == "gguf",
                           learn_rounding=freedoms.get("rounding", False),
                           learn_weights=freedoms.get("train_weights", False))


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("freedom", sorted(FREEDOMS))
def test_gradients_reach_the_freedom_and_its_codes_are_the_forwards_values(grid, freedom):
    torch.manual_seed(0)
    quantizer = _quantizer(GRIDS[grid], **FREEDOMS[freedom])
    weight = torch.randn(24, 64) * 0.05
    target = torch.randn(24, 64) * 0.05
    (quantizer(weight) - target).square().sum().backward()
    for name in ("rounding", "weight_delta"):
        param = getattr(quantizer, name)
        assert (param is None) == (name == "rounding" and freedom == "weights"
                                   or name == "weight_delta" and freedom == "rounding")
        if param is not None:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():  # random values within and beyond the rounding clamp
        if quantizer.rounding is not None:
            quantizer.rounding.uniform_(-0.8, 0.8)
        if quantizer.weight_delta is not None:
            quantizer.weight_delta.normal_(0, 0.01)
        codes = quantizer.quantize(weight)
        assert torch.equal(codes.dequantize(), quantizer(weight))  # exported integers == learned integers
        assert int(codes.codes.min()) >= quantizer.grid.qmin and int(codes.codes.max()) <= quantizer.grid.qmax


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_at_zero_the_freedoms_are_lwc_and_a_rounding_offset_moves_a_code_by_at_most_one(grid):
    torch.manual_seed(1)
    plain, learned = _quantizer(GRIDS[grid]), _quantizer(GRIDS[grid], rounding=True, train_weights=True)
    weight = torch.randn(24, 64) * 0.05
    with torch.no_grad():
        for quantizer in (plain, learned):
            quantizer.upper_logit.fill_(2.0)
            quantizer.lower_logit.fill_(3.0)
        assert torch.equal(learned(weight), plain(weight))
        assert torch.equal(learned.quantize(weight).codes, plain.quantize(weight).codes)
        learned.rounding.fill_(0.49)  # up to the next code, never further
        moved = learned.quantize(weight).codes.int() - plain.quantize(weight).codes.int()
        assert set(moved.unique().tolist()) == {0, 1}  # some codes up by one (in code space), none further
        learned.rounding.fill_(5.0)  # used clamped to 0.5
        clamped = learned.quantize(weight).codes.int() - plain.quantize(weight).codes.int()
        assert set(clamped.unique().tolist()) <= {0, 1}


def _module(quant: QuantConfig, family: str = "llama"):
    model = TINY_BUILDERS[family]()
    if quant.abits < 16:
        use_quantized_attention(model)
    spec = get_arch(model)
    captured = capture_block_inputs(model, spec, torch.randint(0, 384, (3, 32),
                                                               generator=torch.Generator().manual_seed(0)))
    module = BlockModule(get_blocks(model, spec)[0], 0, spec, captured.block_kwargs, quant, TrainConfig())
    return module, captured


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_fused_block_equals_the_fake_quant_block_with_every_freedom_and_let(family):
    module, captured = _module(QuantConfig(wbits=4, abits=8, group_size=16, let=True, rounding=True,
                                           train_weights=True), family)
    with torch.no_grad():
        for p in module.lwc_parameters():
            p.uniform_(0, 5)
        for p in module.freedom_parameters("rounding"):
            p.uniform_(-0.5, 0.5)
        for p in module.freedom_parameters("weights"):
            p.normal_(0, 0.01)
        fake_quant = module(captured.hidden_states)
        fused = module.fuse()
        folded = run_block(fused, captured.hidden_states, captured.block_kwargs)
    for name, codes in module.quantized_weights.items():
        assert torch.equal(fused.get_submodule(name).weight, codes.dequantize())
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)


def test_make_rtn_and_plain_rtn_turn_every_freedom_off():
    module, captured = _module(QuantConfig(wbits=3, group_size=16, rounding=True, train_weights=True))
    reference, _ = _module(QuantConfig(wbits=3, group_size=16, lwc=False))
    with torch.no_grad():
        rtn = reference(captured.hidden_states)
        for p in module.trainable_parameters():
            p.add_(torch.rand_like(p))
        with module.plain_rtn():
            assert torch.equal(module(captured.hidden_states), rtn)
        assert not torch.equal(module(captured.hidden_states), rtn)
        module.make_rtn()
        assert torch.equal(module(captured.hidden_states), rtn)


def test_with_zero_learning_rates_the_freedoms_leave_an_lwc_run_unchanged(tmp_path, tokenizer):
    """rounding_lr = weight_lr = 0: the run learns exactly the LWC-only run's clipping, block losses
    and perplexity, and its offsets and deltas stay 0."""
    from safetensors.torch import load_file

    quant = QuantConfig(wbits=3, group_size=16)
    plain = calibrate(tiny_run_config(tmp_path, "lwc", quant, epochs=2), model=tiny_llama(), tokenizer=tokenizer)
    frozen = calibrate(tiny_run_config(tmp_path, "frozen", QuantConfig(wbits=3, group_size=16, rounding=True,
                                                                       train_weights=True),
                                       epochs=2, rounding_lr=0.0, weight_lr=0.0),
                       model=tiny_llama(), tokenizer=tokenizer)
    assert [b.final_loss for b in frozen.blocks] == [b.final_loss for b in plain.blocks]
    assert frozen.perplexity["omniquant"]["pydoc"].ppl == plain.perplexity["omniquant"]["pydoc"].ppl
    learned, reference = (load_file(tmp_path / name / "learned_params.safetensors") for name in ("frozen", "lwc"))
    assert {k for k in learned if k.endswith((".rounding", ".weight_delta"))} and reference.keys() < learned.keys()
    for key, value in learned.items():
        if key in reference:
            assert torch.equal(value, reference[key]), key
        else:
            assert not value.any(), key


def test_trained_freedoms_lower_the_block_loss_and_resume_to_the_uninterrupted_result(tmp_path, tokenizer):
    quant = QuantConfig(wbits=3, group_size=16, rounding=True, train_weights=True)
    train = {"epochs": 3, "rounding_lr": 1e-2, "weight_lr": 1e-3}
    clean = calibrate(tiny_run_config(tmp_path, "clean", quant, **train), model=tiny_llama(), tokenizer=tokenizer)
    lwc = calibrate(tiny_run_config(tmp_path, "lwc", QuantConfig(wbits=3, group_size=16), epochs=3),
                    model=tiny_llama(), tokenizer=tokenizer)
    assert sum(b.final_loss for b in clean.blocks) < sum(b.final_loss for b in lwc.blocks)
    learned = check_cut_and_resume(tmp_path, tokenizer, tiny_llama, quant, clean, stop_at=1, **train)
    assert learned["layers.1.self_attn.q_proj.rounding"].abs().max() > 0
    assert learned["layers.1.mlp.down_proj.weight_delta"].abs().max() > 0


def test_sign_sgd_moves_every_rounding_offset_by_its_learning_rate_and_a_run_uses_it(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from omniquant_pl.block_step import SignSGD

    offsets = torch.nn.Parameter(torch.zeros(4, 3))
    offsets.grad = torch.tensor([[1.0, -2.0, 0.0]] * 4)
    SignSGD([offsets], lr=0.25).step()
    assert offsets.tolist() == [[-0.25, 0.25, 0.0]] * 4
    quant = QuantConfig(wbits=3, group_size=16, rounding=True)
    calibrate(tiny_run_config(tmp_path, "sign", quant, epochs=2, rounding_optimizer="signsgd", rounding_lr=2**-6,
                              keep_best=False), model=tiny_llama(), tokenizer=tokenizer)
    learned = load_file(tmp_path / "sign" / "learned_params.safetensors")
    offsets = learned["layers.0.self_attn.q_proj.rounding"]
    # every step moves an offset by ±2^-6 (or 0): after 2 epochs of 2 steps, multiples of 2^-6
    assert offsets.abs().max() > 0 and torch.equal(offsets * 64, (offsets * 64).round())


@pytest.mark.parametrize("type_name", ["Q4_K", "IQ4_NL"])
def test_llama_cpp_searched_scales_come_from_the_starting_weights_not_the_learned_deltas(type_name):
    """A replayed block loads its weight deltas before its first forward: the scales llama.cpp's search
    starts from must still be the starting weights', as in the run that learned them."""
    weight = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    trained, replayed = (build_quantizer(type_grid(type_name), tuple(weight.shape),
                                         QuantConfig(lwc=True, train_weights=True)) for _ in range(2))
    with torch.no_grad():
        trained(weight)  # the run's first forward, deltas at 0, fixes the search
        delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.01
        for quantizer in (trained, replayed):
            quantizer.weight_delta.copy_(delta)
        assert torch.equal(replayed(weight), trained(weight))
