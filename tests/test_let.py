"""LET transforms: with quantization off, any LET parameters leave the block's function unchanged."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_BUILDERS
from torch.func import functional_call

from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.calib.capture import capture_block_inputs, run_block
from omniquant_pl.let.params import LETParams
from omniquant_pl.let.transforms import qk_channel_scale
from omniquant_pl.quant.activation_hooks import use_quantized_attention

FAMILIES = sorted(TINY_BUILDERS)


def _random_let(let: LETParams, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in let.named_parameters():
            if "shift" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            else:  # positive scales spread over ~[0.2, 5]
                param.copy_(torch.exp(torch.randn(param.shape, generator=generator) * 0.8))


def _block_and_inputs(family, quantized_attention=False):
    model = TINY_BUILDERS[family](layers=1).double()
    if quantized_attention:  # what the sequencer does for activation quantization
        use_quantized_attention(model)
    spec = get_arch(model)
    windows = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    captured = capture_block_inputs(model, spec, windows)
    return get_blocks(model, spec)[0], spec, captured


@pytest.mark.parametrize("family", FAMILIES)
def test_let_with_quantization_off_is_exact_before_and_after_folding(family):
    block, spec, captured = _block_and_inputs(family)
    let = LETParams(block, spec).double()
    _random_let(let)
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        transformed = let.transformed(block)
        assert {f"{spec.qkv.norm}.weight", f"{spec.out.target}.weight"} <= set(transformed)
        out = functional_call(block, transformed, (captured.hidden_states,), captured.block_kwargs)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)
        names_before = [n for n, _ in block.named_parameters()]
        let.fold_into(block)
        assert [n for n, _ in block.named_parameters()] == names_before  # no extra parameters
        folded = run_block(block, captured.hidden_states, captured.block_kwargs)
        torch.testing.assert_close(folded, reference, rtol=1e-9, atol=1e-9)
        # the transformation did change the weights
        assert not torch.allclose(transformed[f"{spec.qkv.linears[0]}.weight"], reference.new_zeros(1))


def test_gradients_reach_every_let_parameter():
    for family in FAMILIES:
        block, spec, captured = _block_and_inputs(family)
        block.requires_grad_(False)
        let = LETParams(block, spec).double()
        _random_let(let, seed=3)
        out = functional_call(block, let.transformed(block), (captured.hidden_states,), captured.block_kwargs)
        # a non-symmetric function of the output, so no gradient cancels by symmetry
        (out.pow(3).sum() + out[..., 0].sum()).backward()
        for name, param in let.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (family, name)


def test_guarded_scale_floors_magnitude_keeps_sign_and_passes_gradients():
    from omniquant_pl.let.transforms import guarded_scale

    raw = torch.tensor([1e-5, -1e-5, 0.0, 0.5, -2.0, 1e-2], requires_grad=True)
    guarded = guarded_scale(raw)
    assert guarded.tolist() == pytest.approx([1e-2, -1e-2, 1e-2, 0.5, -2.0, 1e-2])
    (guarded * torch.arange(1.0, 7.0)).sum().backward()
    assert raw.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # straight through, also below the floor


@pytest.mark.parametrize("family", FAMILIES)
def test_let_scales_near_zero_are_floored_in_training_and_fusing_alike(family):
    """A scale trained toward 0 must not blow up norm/s (the official code clamps |s| >= 1e-2)."""
    block, spec, captured = _block_and_inputs(family)
    let = LETParams(block, spec).double()
    _random_let(let)
    norm = f"{spec.qkv.norm}.weight"
    original = dict(block.named_parameters())[norm].detach().clone()
    with torch.no_grad():
        let.qkv_scale[0] = 1e-6
        let.out_scale[1] = -1e-7
    transformed = let.transformed(block)
    torch.testing.assert_close(transformed[norm][0], original[0] / 1e-2)
    assert torch.isfinite(torch.stack([v.abs().max() for v in transformed.values()])).all()
    assert max(v.abs().max() for v in transformed.values()) < 1e4
    with torch.no_grad():  # still the original function with quantization off
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        out = functional_call(block, transformed, (captured.hidden_states,), captured.block_kwargs)
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, reference, rtol=1e-9, atol=1e-9)
    transformed[norm].sum().backward()
    assert let.qkv_scale.grad[0] != 0


def test_qk_scale_must_respect_rotary_pairs():
    """Only a scale equal on the two channels of a rotary pair commutes with RoPE: a free
    per-channel scale breaks equivalence, the paired one keeps it."""
    block, spec, captured = _block_and_inputs("llama")
    let = LETParams(block, spec).double()
    assert let.qk_param.shape == (let.geometry.kv_heads, let.geometry.head_dim // 2)
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        let.qk_param.copy_(torch.linspace(0.3, 3.0, let.qk_param.numel()).view_as(let.qk_param))
        paired = functional_call(block, let.transformed(block), (captured.hidden_states,), captured.block_kwargs)
        torch.testing.assert_close(paired, reference, rtol=1e-9, atol=1e-9)
        # an unpaired scale (what ignoring RoPE would do) changes the output
        spec_unpaired = type(spec)(**{**spec.__dict__, "rotary_pairs": None})
        unpaired = LETParams(block, spec_unpaired).double()
        unpaired.qk_param.copy_(torch.linspace(0.3, 3.0, unpaired.qk_param.numel()).view_as(unpaired.qk_param))
        broken = functional_call(block, unpaired.transformed(block), (captured.hidden_states,), captured.block_kwargs)
        assert (broken - reference).abs().max() > 1e-4
    assert torch.equal(qk_channel_scale(torch.tensor([[1.0, 2.0]]), "half"), torch.tensor([[1.0, 2.0, 1.0, 2.0]]))
    assert torch.equal(qk_channel_scale(torch.tensor([[1.0, 2.0]]), "interleaved"), torch.tensor([[1.0, 1.0, 2.0, 2.0]]))


def test_folded_block_equals_unfolded_fake_quant_with_activation_quant():
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.config import QuantConfig, TrainConfig

    for family in FAMILIES:
        block, spec, captured = _block_and_inputs(family, quantized_attention=True)
        block.float()
        hidden = captured.hidden_states.float()
        kwargs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else
                      tuple(t.float() for t in v) if isinstance(v, tuple) else v) for k, v in captured.block_kwargs.items()}
        module = BlockModule(block, 0, spec, kwargs, QuantConfig(wbits=4, abits=6, group_size=16, let=True), TrainConfig())
        _random_let(module.let, seed=5)
        with torch.no_grad():
            for p in module.lwc_parameters():
                p.uniform_(0, 5)
            fake_quant = module(hidden)
            fused = module.fuse()
            folded = run_block(fused, hidden, kwargs)
        assert type(fused.get_submodule(spec.qkv.linears[0])) is torch.nn.Linear
        torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "opt"])
def test_up_down_scale_is_exact_and_folds_into_up_and_down(family):
    """quant.let_up_down: a scale on up_proj's outputs / down_proj's inputs (gated MLPs), folded
    into both: fused == fake-quant (exactness with quantization off: the test above, whose random
    LET includes this scale for these families)."""
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.config import QuantConfig, TrainConfig

    block, spec, captured = _block_and_inputs(family, quantized_attention=True)
    block.float()
    hidden = captured.hidden_states.float()
    kwargs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else
                  tuple(t.float() for t in v) if isinstance(v, tuple) else v) for k, v in captured.block_kwargs.items()}
    module = BlockModule(block, 0, spec, kwargs, QuantConfig(wbits=4, abits=6, let=True, let_up_down=True), TrainConfig())
    assert module.let.down_scale is not None and module.let.down_scale.shape == (block.mlp.up_proj.out_features,)
    _random_let(module.let, seed=7)
    down = f"{spec.up_down.target}.weight"
    transformed = module.let.transformed(block)
    assert not torch.allclose(transformed[down], dict(block.named_parameters())[down])
    with torch.no_grad():
        for p in module.lwc_parameters():
            p.uniform_(0, 5)
        fake_quant = module(hidden)
        folded = run_block(module.fuse(), hidden, kwargs)
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)
    off = QuantConfig(wbits=4, abits=6, let=True, let_up_down=False)
    assert BlockModule(block, 0, spec, kwargs, off, TrainConfig()).let.down_scale is None


def _tiny_run(tmp_path, tokenizer, family, quant, epochs=20):
    import test_sequencer

    from omniquant_pl import TrainConfig

    results, _ = test_sequencer._run(tmp_path, tokenizer, family, f"{family}-{quant.let}", layers=1, quant=quant,
                                     outliers=True,
                                     train=TrainConfig(epochs=epochs, batch_size=2), save_model=False)
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a4_lwc_let_lowers_block_loss_well_below_rtn(tmp_path, tokenizer, family):
    """With outlier activation channels, LWC+LET must beat RTN by far, and beat LWC alone."""
    from omniquant_pl import QuantConfig

    with_let = _tiny_run(tmp_path, tokenizer, family, QuantConfig(wbits=4, abits=4, let=True, let_alpha=0.75))
    lwc_only = _tiny_run(tmp_path, tokenizer, family, QuantConfig(wbits=4, abits=4, let=False))
    (block,), (lwc_block,) = with_let.blocks, lwc_only.blocks
    assert block.final_loss < 0.5 * block.rtn_loss, block
    assert block.final_loss < 0.8 * lwc_block.final_loss, (block, lwc_block)
    assert {"fp", "rtn", "omniquant"} <= set(with_let.perplexity)


def test_opt_weight_only_let_learns_shifts_and_beats_lwc_alone(tmp_path, tokenizer):
    """As the official OPT scripts: weight-only LET on OPT has shifts (folded into biases), and with
    activation outliers it lowers the block loss well below LWC alone."""
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.config import QuantConfig, TrainConfig

    block, spec, _ = _block_and_inputs("opt")
    module = BlockModule(block.float(), 0, spec, {}, QuantConfig(wbits=3, let=True), TrainConfig())
    assert module.let.qkv_shift is not None and module.let.fc1_shift is not None
    with_let = _tiny_run(tmp_path, tokenizer, "opt", QuantConfig(wbits=3, let=True), epochs=10)
    lwc_only = _tiny_run(tmp_path, tokenizer, "opt", QuantConfig(wbits=3, let=False), epochs=10)
    (block_let,), (block_lwc,) = with_let.blocks, lwc_only.blocks
    assert block_let.final_loss < 0.5 * block_lwc.final_loss, (block_let, block_lwc)


def test_fp16_amp_is_replaced_for_8bit_activations():
    from omniquant_pl.plan import overflow_safe_precision

    assert overflow_safe_precision("16-mixed", 8, bf16_supported=True) == "bf16-mixed"
    assert overflow_safe_precision("16-mixed", 8, bf16_supported=False) == "32-true"
    assert overflow_safe_precision("16-mixed", 4, bf16_supported=True) == "16-mixed"
    assert overflow_safe_precision("16-mixed", 16, bf16_supported=True) == "16-mixed"
    assert overflow_safe_precision("bf16-mixed", 8, bf16_supported=True) == "bf16-mixed"


@pytest.mark.parametrize("let", [True, False])
def test_32_true_on_a_half_precision_model_trains_in_fp32_and_gives_the_model_back_in_its_dtype(tmp_path, tokenizer, let):
    """32-true (what the fp16-overflow guard picks without bf16, and what the non-finite-loss error
    recommends) on an fp16 model: the block trains in fp32 (LET's transformed weights and the
    untouched down_proj alike), then the fused block returns to fp16."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
    from omniquant_pl.quant.codes import load_block_codes

    model = tiny_llama(layers=2).half()
    config = RunConfig(
        model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4, abits=8, let=let),
        calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
        train=TrainConfig(epochs=2, batch_size=2, precision="32-true", keep_best_rtn=True),
        eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
        output_dir=str(tmp_path / "out"), save_model=False,
    )
    results = calibrate(config, model=model, tokenizer=tokenizer)
    assert results.plan.precision == "32-true"
    assert all(0 < b.final_loss <= b.rtn_loss for b in results.blocks), results.blocks
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    import math

    assert math.isfinite(results.perplexity["omniquant"]["pydoc"].ppl)
    codes = load_block_codes(tmp_path / "out", 1)
    q_proj = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(codes["self_attn.q_proj"].dequantize().to(torch.float16), q_proj.data)
    assert load_file(tmp_path / "out" / "learned_params.safetensors")


def test_nonfinite_loss_restores_and_retries_at_lower_lr(tmp_path, tokenizer):
    import json

    import test_sequencer
    from lightning.pytorch.callbacks import Callback

    from omniquant_pl import QuantConfig, TrainConfig

    class PoisonOnce(Callback):
        """Make block 0's clipping NaN during its first fit only."""

        def __init__(self):
            self.done = False

        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.index == 0 and not self.done and trainer.current_epoch == 1:
                self.done = True
                with torch.no_grad():
                    pl_module.lwc_parameters()[0].fill_(float("nan"))

    model = test_sequencer.TINY_BUILDERS["llama"](layers=1)
    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, RunConfig, calibrate

    cfg = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4, abits=8, let=True),
                    calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=3, batch_size=2),
                    eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                    output_dir=str(tmp_path / "nan"), save_model=False)
    results = calibrate(cfg, callbacks=[PoisonOnce()], model=model, tokenizer=tokenizer)
    (block,) = results.blocks
    assert len(block.nonfinite_retries) == 1 and block.nonfinite_retries[0]["next_lr_scale"] == 0.5
    assert len(block.epoch_losses) == 3 and all(map(__import__("math").isfinite, block.epoch_losses))
    assert json.loads((tmp_path / "nan" / "results.json").read_text())["blocks"][0]["nonfinite_retries"]
    assert torch.isfinite(torch.tensor(results.perplexity["omniquant"]["pydoc"].ppl))
