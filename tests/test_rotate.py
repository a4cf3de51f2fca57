"""Rotations folded into the weights (quant.rotate): the rotated model computes the original's
logits; refused in one line where they would not be exact."""
from __future__ import annotations

import types

import pytest
import torch
from conftest import TINY_VOCAB, tiny_opt

from omniquant_pl.arch import get_arch
from omniquant_pl.errors import ConfigError
from omniquant_pl.rotate import orthogonal, rotate_model


def _float64_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _family(name: str, tied: bool = False):
    import transformers

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v biases
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # q/k norms per head
    }[name]
    torch.manual_seed(0)
    model = model_class(config_class(**common)).double().eval()
    for module in model.modules():  # transformers' RMSNorm computes in float32 even in a float64 model
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_float64_rms_norm, module)
    with torch.no_grad():  # norm gains and biases away from their initial 1 / 0, so folding them matters
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.uniform_(0.5, 1.5)
            elif name_.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["random", "hadamard"])
@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False),
                                          ("qwen3", True)])
def test_rotated_model_computes_the_original_logits(family, tied, kind):
    model = _family(family, tied)
    ids = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        weights_before = model.model.layers[0].self_attn.q_proj.weight.clone()
        rotate_model(model, get_arch(model), kind, seed=3)
        after = model(input_ids=ids).logits
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, weights_before)  # it did rotate
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.allclose(after, before, rtol=0, atol=1e-9), (after - before).abs().max()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False


def test_rotation_spreads_an_outlier_channel():
    """What rotation is for: a residual channel 100x the others becomes many channels of similar size."""
    x = torch.randn(256, 64, dtype=torch.float64)
    x[:, 5] *= 100
    rotated = x @ orthogonal("hadamard", 64, seed=0)
    assert x.abs().amax(0).max() / x.abs().amax(0).median() > 50
    assert rotated.abs().amax(0).max() / rotated.abs().amax(0).median() < 3


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_orthogonal_matrices_are_orthogonal_and_reproducible(kind):
    q = orthogonal(kind, 64, seed=7)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(kind, 64, seed=7)) and not torch.equal(q, orthogonal(kind, 64, seed=8))


def test_not_exact_families_and_sizes_are_refused_in_one_line():
    model = tiny_opt()
    with pytest.raises(ConfigError, match="quant.rotate random is exact only.*opt's norms are not plain RMSNorms"):
        rotate_model(model, get_arch(model), "random")
    with pytest.raises(ConfigError, match="hadamard needs power-of-two sizes, but this model has 48"):
        orthogonal("hadamard", 48, 0)


def test_norm_gain_folding_alone_keeps_the_logits():
    from omniquant_pl.rotate import fold_norm_gains

    model = _family("llama", tied=True)
    ids = torch.randint(0, TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fold_norm_gains(model, get_arch(model))
        after = model(input_ids=ids).logits
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if n.endswith("norm"))
    assert torch.allclose(after, before, rtol=0, atol=1e-9)


def test_a_rotated_run_calibrates_saves_and_reloads_with_its_logits(tmp_path, tokenizer):
    """W4A4 with LWC + LET on the rotated model: the saved model (ordinary weights, untied head)
    reproduces the run's fused model, and with quantization off the run equals the original."""
    from conftest import tiny_llama

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = RunConfig(model=ModelConfig(str(model_dir), dtype="float32"),
                       quant=QuantConfig(wbits=4, abits=4, group_size=16, let=True, rotate="hadamard"),
                       calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
                       train=TrainConfig(epochs=1, batch_size=2),
                       eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=2, baselines=["fp"]),
                       output_dir=str(tmp_path / "out"))
    results = calibrate(config)
    import json

    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["omniquant"]["rotate"] == "hadamard"
    # the FP baseline of the rotated model is the original's FP (the rotation is exact)
    from omniquant_pl.eval.runner import evaluate_target, resolve_target

    fp = evaluate_target(resolve_target(ModelConfig(str(model_dir))), config.eval, [], QuantConfig(), torch.device("cpu"))
    assert abs(results.perplexity["fp"]["pydoc"].ppl - fp["perplexity"]["fp"]["pydoc"]["ppl"]) < 1e-3
    reloaded = evaluate_target(resolve_target(ModelConfig(str(tmp_path / "out"))), config.eval, [], QuantConfig(),
                               torch.device("cpu"))
    assert reloaded["perplexity"]["omniquant"]["pydoc"]["ppl"] == pytest.approx(
        results.perplexity["omniquant"]["pydoc"].ppl, rel=1e-5)


def _saved_tiny_llama_run(tmp_path, tokenizer, quant, eval_config):
    """A tiny Llama saved under tmp_path/model and the RunConfig calibrating it into tmp_path/full
    (4 x 32 pydoc tokens, 2 epochs, batch 2)."""
    from conftest import tiny_llama

    from omniquant_pl import CalibConfig, ModelConfig, RunConfig, TrainConfig

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return RunConfig(model=ModelConfig(str(model_dir), dtype="float32"), quant=quant,
                     calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=2, batch_size=2),
                     eval=eval_config, output_dir=str(tmp_path / "full"))


def _assert_resuming_after_block_0_equals(config, tmp_path):
    """The finished run in tmp_path/full, copied and cut back to its first block, resumes to
    bit-identical learned parameters."""
    import dataclasses
    import json
    import shutil

    from safetensors.torch import load_file

    from omniquant_pl import calibrate

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    state = json.loads((cut / "checkpoint.json").read_text())
    state["finished_blocks"], state["results"]["blocks"] = 1, state["results"]["blocks"][:1]
    (cut / "checkpoint.json").write_text(json.dumps(state))
    (cut / "learned" / "block_001.safetensors").unlink()
    calibrate(dataclasses.replace(config, output_dir=str(cut), resume=True))
    full, resumed = load_file(tmp_path / "full" / "learned_params.safetensors"), load_file(cut / "learned_params.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_rotated_run_resumed_after_its_first_block_equals_the_uninterrupted_one(tmp_path, tokenizer):
    from omniquant_pl import EvalConfig, QuantConfig, calibrate

    config = _saved_tiny_llama_run(tmp_path, tokenizer, QuantConfig(wbits=3, group_size=16, rounding=True,
                                                                    rotate="random", rotate_seed=4), EvalConfig(datasets=[]))
    calibrate(config)
    _assert_resuming_after_block_0_equals(config, tmp_path)


@pytest.mark.parametrize("online", ["down", "all"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_online_rotations_with_quantizers_off_keep_the_logits(family, online):
    """quant.rotate_online: each quantized linear uses W·R and its input x·R (here with identity
    quantizers), the folded part as before: the original's logits in float64."""
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.quant.activation_hooks import _input_quant_hook
    from omniquant_pl.quant.linear import quantize_block_linears, restore_block_linears
    from omniquant_pl.rotate import online_rotations

    model = _family(family)
    spec = get_arch(model)
    ids = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        rotate_model(model, spec, "random", seed=5, online=online)
        blocks = list(get_blocks(model, spec))
        rotations = online_rotations(spec, "random", 5, online, blocks[0])
        expected = {"down": {"mlp.down_proj"}, "all": {"mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}}
        assert set(rotations) == expected[online]
        for block in blocks:
            quantize_block_linears(block, spec.linear_names, lambda name, linear: None, rotations)
            restore_block_linears(block)  # the fused linears hold W·R
            for name, rotation in rotations.items():
                block.get_submodule(name).register_forward_pre_hook(_input_quant_hook(lambda x: x, rotation))
        after = model(input_ids=ids).logits
    assert not torch.allclose(blocks[0].mlp.down_proj.weight, _family(family).model.layers[0].mlp.down_proj.weight)
    norm_gains_kept = torch.equal(model.model.norm.weight, _family(family).model.norm.weight)
    assert norm_gains_kept == (online == "all")  # "all" leaves the residual stream and the gains alone
    assert torch.allclose(after, before, rtol=0, atol=1e-9), (after - before).abs().max()


def test_online_rotations_are_refused_where_they_cannot_run_in_one_line():
    from omniquant_pl import QuantConfig
    from omniquant_pl.export.compressed_tensors import check_exportable

    with pytest.raises(ConfigError, match="needs quant.abits below 16 and quant.rotate"):
        QuantConfig(wbits=4, rotate="random", rotate_online="down")
    with pytest.raises(ConfigError, match="needs quant.abits below 16 and quant.rotate"):
        QuantConfig(wbits=4, abits=4, rotate_online="all")
    with pytest.raises(ConfigError, match="with quant.rotate_online set quant.lwc_search: false"):
        QuantConfig(wbits=4, abits=4, rotate="random", rotate_online="all", lwc_search=True)
    with pytest.raises(ConfigError, match="no engine reading compressed-tensors runs"):
        check_exportable(QuantConfig(wbits=8, abits=8, symmetric=True, rotate="random", rotate_online="down"))
    model = _family("llama")
    with pytest.raises(ConfigError, match="hadamard needs power-of-two sizes"):
        model.config.intermediate_size = 96
        rotate_model(model, get_arch(model), "hadamard", online="down")


@pytest.mark.parametrize("online, absent", [("down", {"down_scale"}),
                                            ("all", {"down_scale", "qkv_scale", "fc1_scale"})])
def test_let_learns_no_scale_where_a_rotation_runs_online(online, absent):
    from omniquant_pl import QuantConfig
    from omniquant_pl.let.params import LETParams

    model = _family("llama")
    quant = QuantConfig(wbits=4, abits=4, let=True, rotate="random", rotate_online=online)
    let = LETParams.for_run(model.model.layers[0], get_arch(model), quant)
    names = {name for name, _ in let.named_parameters()}
    assert names.isdisjoint(absent) and "out_scale" in names
    assert "down_scale" in {n for n, _ in LETParams.for_run(model.model.layers[0], get_arch(model),
                                                             QuantConfig(wbits=4, abits=4, let=True)).named_parameters()}


def test_an_online_rotated_run_saves_reloads_and_resumes_with_its_logits(tmp_path, tokenizer):
    """W4A4 + LWC + LET with quant.rotate_online all: the saved model, loaded by the evaluation loader,
    reproduces the run (its config records the rotations), and a run cut after block 0 resumes to the
    same learned parameters."""
    import json

    from omniquant_pl import EvalConfig, ModelConfig, QuantConfig, calibrate
    from omniquant_pl.eval.runner import evaluate_target, resolve_target

    config = _saved_tiny_llama_run(tmp_path, tokenizer,
                                   QuantConfig(wbits=4, abits=4, let=True, rotate="random", rotate_online="all"),
                                   EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=2, baselines=["fp"]))
    results = calibrate(config)
    saved = json.loads((tmp_path / "full" / "model" / "config.json").read_text())["omniquant"]
    assert (saved["rotate"], saved["rotate_online"]) == ("random", "all")
    reloaded = evaluate_target(resolve_target(ModelConfig(str(tmp_path / "full"))), config.eval, [], QuantConfig(),
                               torch.device("cpu"))
    assert reloaded["perplexity"]["omniquant"]["pydoc"]["ppl"] == pytest.approx(
        results.perplexity["omniquant"]["pydoc"].ppl, rel=1e-5)
    _assert_resuming_after_block_0_equals(config, tmp_path)


def test_the_rtn_baseline_of_an_online_rotated_run_rotates_its_weights_and_inputs():
    """W8A8 RTN with quant.rotate_online all stays near the float logits (weights W·R, inputs x·R);
    the rotated weights without the rotated inputs would compute another function."""
    from omniquant_pl import QuantConfig
    from omniquant_pl.quant.rtn import rtn_model

    model = _family("llama")
    spec = get_arch(model)
    ids = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    quant = QuantConfig(wbits=8, abits=8, rotate="random", rotate_online="all")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        rotate_model(model, spec, "random", seed=0, online="all")
        weight = model.model.layers[0].mlp.down_proj.weight.clone()
        with rtn_model(model, spec, quant):
            rtn = model(input_ids=ids).logits
            assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, weight, atol=1e-2)  # W·R on the grid
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, weight)  # restored afterwards
        assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks
    assert (rtn - before).abs().max() < 0.05 * before.abs().max()
