"""Mixtral and Qwen3-MoE: experts stored as 3-D tensors (mlp.experts.gate_up_proj / down_proj) get
LWC per expert and output channel; the router (mlp.gate) stays floating point, and LET's norm scale
folds into it as into every expert's gate_up, so routing is unchanged."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB
from family_checks import block_output, capture_block, check_cut_and_resume, tiny_run_config
from test_let import _random_let

from omniquant_pl import QuantConfig, TrainConfig
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.base import NormGroup
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import run_block
from omniquant_pl.let.params import LETParams
from omniquant_pl.quant.act import PerTokenActQuantizer
from omniquant_pl.quant.activation_hooks import use_quantized_attention
from omniquant_pl.quant.codes import load_block_codes
from omniquant_pl.quant.experts import expert_token_counts

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, EXPERTS, TOP_K = 64, 4, 2, 16, 64, 4, 2
FAMILIES = ("mixtral", "qwen3_moe")


def tiny_moe(family: str, seed: int = 0, layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": TINY_VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, "num_experts_per_tok": TOP_K}
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS, **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=INTERMEDIATE, intermediate_size=INTERMEDIATE,
                                                   num_experts=EXPERTS, norm_topk_prob=True, **common))
    with torch.no_grad():  # the default init (std 0.02) routes almost at random: spread the router's logits
        for block in model.model.layers:
            block.mlp.gate.weight.normal_(0, 0.5)
    model.set_experts_implementation("eager")  # the CPU default, grouped_mm, has no float64 kernel
    return model.eval()


def _block_and_inputs(family, quantized_attention=False, dtype=torch.float64):
    model = tiny_moe(family, layers=1).to(dtype)
    if quantized_attention:
        use_quantized_attention(model)
    return capture_block(model)


def _routing(experts, run):
    """The experts module's top-k indices during `run()`."""
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        out = run()
    finally:
        handle.remove()
    return out, torch.cat(seen)


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_and_let_folding_is_exact_with_routing_unchanged(family):
    block, spec, captured = _block_and_inputs(family)
    assert spec.name == family and spec.experts is not None and spec.up_down is None
    assert spec.let_qk == (family == "mixtral")  # Qwen3's q/k norms undo a q/k scale
    spec.check_block(block)
    assert spec.linear_names == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    assert spec.expert_tensors == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    let = LETParams(block, spec).double()
    _random_let(let)
    original = {n: p.detach().clone() for n, p in block.named_parameters()}
    run = lambda: run_block(block, captured.hidden_states, captured.block_kwargs)
    with torch.no_grad():
        reference, routes = _routing(block.mlp.experts, run)
        assert len(torch.unique(routes)) == EXPERTS  # every expert is used: the check below means something
        transformed = let.transformed(block)
        torch.testing.assert_close(block_output(block, transformed, captured), reference, rtol=1e-9, atol=1e-9)
        let.fold_into(block)
        folded, folded_routes = _routing(block.mlp.experts, run)
    torch.testing.assert_close(folded, reference, rtol=1e-9, atol=1e-9)
    assert torch.equal(folded_routes, routes)
    scale = let.fc1_scale.detach()
    torch.testing.assert_close(transformed["mlp.gate.weight"], original["mlp.gate.weight"] * scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(transformed["mlp.experts.gate_up_proj"], original["mlp.experts.gate_up_proj"] * scale,
                               rtol=1e-12, atol=0)  # every expert, gate and up rows
    # what the test guards against: the norm scale left out of the router changes the routing
    without_router = dataclasses.replace(spec, fc1=NormGroup("post_attention_layernorm", ("mlp.experts.gate_up_proj",)))
    block, _, captured = _block_and_inputs(family)
    let = LETParams(block, without_router).double()
    _random_let(let)
    with torch.no_grad():
        reference, routes = _routing(block.mlp.experts, lambda: run_block(block, captured.hidden_states, captured.block_kwargs))
        wrong, wrong_routes = _routing(block.mlp.experts, lambda: block_output(block, let.transformed(block), captured))
    assert (wrong - reference).abs().max() > 1e-4 and not torch.equal(wrong_routes, routes)


def _float_module(family, quant: QuantConfig):
    block, spec, captured = _block_and_inputs(family, quantized_attention=quant.abits < 16, dtype=torch.float32)
    with torch.no_grad():
        full_precision = run_block(block, captured.hidden_states, captured.block_kwargs)
    return BlockModule(block, 0, spec, captured.block_kwargs, quant, TrainConfig()), spec, captured, full_precision


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_fake_quant_and_every_expert_ends_on_the_grid(family, tmp_path):
    module, spec, captured, full_precision = _float_module(family, QuantConfig(wbits=4, abits=4, group_size=16, let=True))
    _random_let(module.let, seed=5)
    experts_quantizers = module.quant_experts.quantizers
    assert experts_quantizers["gate_up_proj"].upper_logit.shape == (EXPERTS * 2 * INTERMEDIATE * HIDDEN // 16, 1)
    with torch.no_grad():
        for p in module.lwc_parameters():
            p.uniform_(0, 5)
        router = module.block.mlp.gate.weight.clone()
        fake_quant = module(captured.hidden_states)
        fused = module.fuse()
        folded = run_block(fused, captured.hidden_states, captured.block_kwargs)
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)
    assert (fake_quant - full_precision).abs().max() > 1e-3  # the quantization did something
    assert type(fused.mlp.experts).__name__.endswith("Experts") and fused.mlp.experts.gate_up_proj.dim() == 3
    # the router stays floating point: only LET's scale reaches it
    torch.testing.assert_close(fused.mlp.gate.weight, router * module.let.fc1_scale.detach(), rtol=1e-6, atol=0)
    assert len(torch.unique(fused.mlp.gate.weight)) > 16 * EXPERTS
    from omniquant_pl.quant.codes import save_block_codes

    save_block_codes(tmp_path, 0, module.quantized_weights)
    codes = load_block_codes(tmp_path, 0)
    assert set(codes) == {*spec.linear_names, *spec.expert_tensors}
    for name in spec.expert_tensors:
        tensor = fused.get_parameter(name)  # (E, out, in)
        assert codes[name].shape == (tensor.shape[0] * tensor.shape[1], tensor.shape[2])
        torch.testing.assert_close(codes[name].dequantize().reshape(tensor.shape), tensor, rtol=0, atol=0)
        groups = tensor.reshape(-1, 16)  # every expert's every output channel's groups of 16
        assert max(len(torch.unique(group)) for group in groups) <= 16


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a4_hooks_reach_every_linear_every_expert_input_and_qkv(family, monkeypatch):
    module, spec, captured, _ = _float_module(family, QuantConfig(wbits=4, abits=4))
    quantized_inputs = []
    forward = PerTokenActQuantizer.forward

    def recording_forward(self, x):
        quantized_inputs.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(PerTokenActQuantizer, "forward", recording_forward)
    tokens = captured.hidden_states.shape[0] * captured.hidden_states.shape[1]
    with torch.no_grad():
        _, routes = _routing(module.block.mlp.experts.original, lambda: module(captured.hidden_states))
    hit = torch.bincount(routes.reshape(-1), minlength=EXPERTS)
    assert module.act_quantizers.qkv_calls == 1
    assert module.act_quantizers.expert_linear_calls == 2 * int((hit > 0).sum())
    attention = [s for s in quantized_inputs if len(s) == 4]
    assert sorted(attention) == sorted([(2, HEADS, 24, HEAD_DIM), (2, KV_HEADS, 24, HEAD_DIM), (2, KV_HEADS, 24, HEAD_DIM)])
    linears = [s for s in quantized_inputs if len(s) == 3]  # q/k/v/o: (B, T, in)
    assert len(linears) == len(spec.linear_names) == 4
    expert_inputs = [s for s in quantized_inputs if len(s) == 2]  # (routed tokens, in): gate_up's, then down's
    assert len(expert_inputs) == 2 * int((hit > 0).sum())
    assert sum(rows for rows, _ in expert_inputs) == 2 * tokens * TOP_K  # every routed (token, expert) pair, twice

    # after fusing, the same hooks on transformers' experts module: its output is the per-expert
    # reference with both inputs quantized per token (the router's input is not)
    monkeypatch.setattr(PerTokenActQuantizer, "forward", forward)
    fused = module.fuse()
    experts, quantize = fused.mlp.experts, module.act_quantizers.quantizer
    x = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([[e % EXPERTS, (e + 1) % EXPERTS] for e in range(10)])
    weights = torch.rand(10, TOP_K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = experts(x, index, weights)
        expected = torch.zeros_like(x)
        for token in range(10):
            for slot in range(TOP_K):
                e = index[token, slot]
                gate, up = F.linear(quantize(x[token : token + 1]), experts.gate_up_proj[e]).chunk(2, dim=-1)
                hidden = quantize(experts.act_fn(gate) * up)
                expected[token] += weights[token, slot] * F.linear(hidden, experts.down_proj[e])[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _starve_expert(model, expert: int = EXPERTS - 1):
    """Block 0 never routes a token to `expert`: channel 0 of the residual is a constant 1 (the
    embeddings' column 0, the others ~N(0, 1); block 0's attention adds nothing to it), and only
    that expert's router row reads it, with a large negative weight."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)
        model.model.embed_tokens.weight[:, 0] = 1.0
        block = model.model.layers[0]
        block.self_attn.o_proj.weight[0] = 0.0
        block.mlp.gate.weight[:, 0] = 0.0
        block.mlp.gate.weight[expert] = 0.0
        block.mlp.gate.weight[expert, 0] = -100.0
    return model


@pytest.mark.parametrize("family,quant", [("mixtral", {"wbits": 4, "group_size": 16}),
                                          ("qwen3_moe", {"wbits": 4, "abits": 4, "let": True, "group_size": 16})],
                         ids=["mixtral-w4a16", "qwen3_moe-w4a4-let"])
def test_calibrates_end_to_end_counts_tokens_per_expert_and_resumes(family, quant, tmp_path, tokenizer, caplog):
    from safetensors.torch import load_file

    from omniquant_pl import calibrate

    quant = QuantConfig(**quant)
    model = lambda: _starve_expert(tiny_moe(family))
    with caplog.at_level(logging.WARNING):
        clean = calibrate(tiny_run_config(tmp_path, "clean", quant, keep_best=False), model=model(), tokenizer=tokenizer)
    assert "block 0: experts [3] received no calibration tokens" in caplog.text
    for block in clean.blocks:
        assert len(block.expert_tokens) == EXPERTS and sum(block.expert_tokens) == 4 * 32 * TOP_K
    assert clean.blocks[0].expert_tokens[EXPERTS - 1] == 0
    assert all(count > 0 for count in clean.blocks[1].expert_tokens)
    learned = load_file(tmp_path / "clean" / "learned_params.safetensors")
    for name in ("gate_up_proj", "down_proj"):
        upper = learned[f"layers.0.mlp.experts.{name}.lwc.upper"].view(EXPERTS, -1)
        assert torch.all(upper[EXPERTS - 1] == QuantConfig().lwc_init)  # the starved expert: initial clipping
        assert not torch.all(upper[0] == QuantConfig().lwc_init)  # a routed one learned
    codes = load_block_codes(tmp_path / "clean", 0)
    assert codes["mlp.experts.down_proj"].shape == (EXPERTS * HIDDEN, INTERMEDIATE)
    assert torch.isfinite(torch.tensor(clean.perplexity["omniquant"]["pydoc"].ppl))
    check_cut_and_resume(tmp_path, tokenizer, model, quant, clean, stop_at=1, keep_best=False)


def test_token_counts_and_dense_blocks_are_refused():
    block, spec, captured = _block_and_inputs("mixtral")
    with torch.no_grad(), expert_token_counts(block, spec.experts) as counts:
        run_block(block, captured.hidden_states, captured.block_kwargs)
    assert sum(counts) == 2 * 24 * TOP_K and len(counts) == EXPERTS
    from omniquant_pl.eval.size import packed_bytes

    model = tiny_moe("mixtral")  # the size report packs the expert tensors too: 2 blocks of 4·(128 + 64)·64 weights
    fp16 = packed_bytes(model)
    assert fp16 - packed_bytes(model, QuantConfig(wbits=4)) > 2 * EXPERTS * 3 * INTERMEDIATE * HIDDEN * 1.5 * 0.9
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                               head_dim=HEAD_DIM, moe_intermediate_size=INTERMEDIATE,
                                               intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                                               mlp_only_layers=[1]))
    spec = get_arch(model)
    spec.check_block(model.model.layers[0])
    with pytest.raises(RuntimeError, match="block 1 of this qwen3_moe model has no experts module"):
        spec.check_block(model.model.layers[1], 1)
