"""Gemma 3 (text): norms that multiply by (1 + w) (the LET norm fold keeps the offset), four norms per
block (two act on outputs, after o_proj and down_proj), per-head q/k norms (no q/k scale), and
sliding-window layers alternating with full ones: each block keeps its own mask and rotary table."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_VOCAB
from family_checks import (
    block_output,
    capture_block,
    check_calibrates_and_resumes,
    check_w4a4_hooks,
    fuse_with_random_parameters,
)
from test_let import _random_let

from omniquant_pl import QuantConfig, TrainConfig
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import run_block
from omniquant_pl.let.params import LETParams
from omniquant_pl.quant.activation_hooks import ATTENTION_NAME, use_quantized_attention

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, WINDOW = 64, 4, 2, 16, 128, 4
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")


def tiny_gemma3(seed: int = 0, layers: int = 3, sliding_window: int = WINDOW):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
        sliding_window=sliding_window, layer_types=list(LAYER_TYPES[:layers]), query_pre_attn_scalar=HEAD_DIM,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (a gain of 1): make every gain non-trivial
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape) * 0.5)
    return model


@pytest.fixture
def exact_norms(monkeypatch):
    """Gemma3RMSNorm computes in float32 whatever the input; the same formula in the input's dtype
    lets float64 checks reach 1e-9."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(Gemma3RMSNorm, "forward", forward)


def _block_and_inputs(index=0, quantized_attention=False, dtype=torch.float64, seqlen=16):
    model = tiny_gemma3().to(dtype)
    if quantized_attention:
        use_quantized_attention(model)
    return (model, *capture_block(model, index, seqlen, lowest_id=3))


def test_gemma3_entry_and_per_block_inputs():
    """Block inputs include the sqrt(hidden) embedding scale; each block gets its layer type's mask
    and rotary table, and chaining the blocks on them reproduces the model."""
    model, block, spec, captured = _block_and_inputs()
    assert spec.name == "gemma3" and not spec.let_qk and spec.norm_weight_offset == 1.0
    assert spec.qkv.norm == "input_layernorm" and spec.fc1.norm == "pre_feedforward_layernorm"
    for block in get_blocks(model, spec):
        spec.check_block(block)
    windows = torch.randint(3, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    embedded = model.model.embed_tokens.weight[windows] * HIDDEN**0.5
    torch.testing.assert_close(captured.hidden_states, embedded, rtol=1e-12, atol=0)
    sliding, full, sliding_again = captured.layer_kwargs
    assert sliding["attention_mask"] is sliding_again["attention_mask"]
    assert full["attention_mask"] is None  # plain causal: SDPA's is_causal
    assert sliding["attention_mask"][0, 0, 15].sum() == WINDOW  # the last token sees the last 4 only
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # local rope base
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True).hidden_states
        hidden = captured.hidden_states
        for i, block in enumerate(get_blocks(model, spec)[:-1]):
            hidden = run_block(block, hidden, captured.layer_kwargs[i])
            torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-9, atol=1e-9)
        shared = run_block(get_blocks(model, spec)[1], reference[1], captured.block_kwargs)  # block 0's kwargs
    assert (shared - reference[2]).abs().max() > 1e-4  # a full layer with the sliding mask is wrong


def _deviation(spec, index=0, fold=False):
    _, block, _, captured = _block_and_inputs(index)
    let = LETParams(block, spec).double()
    _random_let(let, seed=index)
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.layer_kwargs[index])
        if fold:
            let.fold_into(block)
            return (run_block(block, captured.hidden_states, captured.layer_kwargs[index]) - reference).abs().max()
        return (block_output(block, let.transformed(block), captured, captured.layer_kwargs[index]) - reference).abs().max()


@pytest.mark.parametrize("index", [0, 1], ids=["sliding", "full"])
def test_let_with_quantization_off_is_exact_and_needs_the_norm_offset(exact_norms, index):
    """norm->q/k/v, pre_feedforward norm->gate/up, v->o, up->down at random values: the block is
    unchanged (float64), transformed or folded; folding as if the gain were w (not 1 + w) breaks it."""
    spec = get_arch("gemma3_text")
    assert _deviation(spec, index) < 1e-9 and _deviation(spec, index, fold=True) < 1e-9
    no_offset = dataclasses.replace(spec, norm_weight_offset=0.0)
    assert _deviation(no_offset, index) > 1e-3
    qk = dataclasses.replace(spec, let_qk=True)  # q_norm/k_norm undo a q/k scale: why the entry has none
    assert _deviation(qk, index) > 1e-3


def _float_module(quant: QuantConfig, index=0):
    _, block, spec, captured = _block_and_inputs(index, quantized_attention=True, dtype=torch.float32)
    with torch.no_grad():
        full_precision = run_block(block, captured.hidden_states, captured.layer_kwargs[index])
    module = BlockModule(block, index, spec, captured.layer_kwargs[index], quant, TrainConfig())
    return module, spec, captured, full_precision


def test_fused_block_equals_fake_quant_block_w4a4_with_let():
    module, spec, captured, full_precision = _float_module(QuantConfig(wbits=4, abits=4, group_size=16, let=True))
    assert module.let.down_scale is not None and module.let.qk_param is None
    fake_quant, fused, folded = fuse_with_random_parameters(module, captured)
    assert {type(fused.get_submodule(n)) for n in spec.linear_names} == {torch.nn.Linear}
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)
    assert (fake_quant - full_precision).abs().max() > 1e-3


def test_w4a4_hooks_quantize_every_linear_input_and_q_k_v(monkeypatch):
    module, spec, captured, _ = _float_module(QuantConfig(wbits=4, abits=4, let=True))
    assert sorted(module.quant_linears) == sorted(spec.linear_names) and len(spec.linear_names) == 7
    check_w4a4_hooks(module, captured.hidden_states, monkeypatch,
                     [(2, HEADS, 16, HEAD_DIM), (2, KV_HEADS, 16, HEAD_DIM), (2, KV_HEADS, 16, HEAD_DIM)])


def test_quantized_attention_path_keeps_sliding_window_and_padding_masks():
    """Quantizers off: the whole model through our attention function gives the model's own SDPA
    logits on 16 tokens (window 4, both layer types), left-padded; the window matters here."""
    input_ids = torch.randint(3, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding on the second row
    model = tiny_gemma3().double()
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
        use_quantized_attention(model)
        assert model.config._attn_implementation == ATTENTION_NAME
        routed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(routed, reference, rtol=1e-9, atol=1e-9)
        wide = tiny_gemma3(sliding_window=64).double()  # same weights, a window wider than the input
        assert (wide(input_ids=input_ids, attention_mask=attention_mask).logits - reference).abs().max() > 1e-3
        unpadded = model(input_ids=input_ids).logits
    assert (unpadded[1] - reference[1]).abs().max() > 1e-3  # the padding mask mattered too


def test_w4a4_let_calibrates_end_to_end_and_resumes_to_the_same_result(tmp_path, tokenizer):
    learned = check_calibrates_and_resumes(tmp_path, tokenizer, tiny_gemma3, blocks=3, stop_at=2)
    assert learned["layers.1.let.down_scale"].shape == (INTERMEDIATE,)
    assert "layers.1.let.qk_param" not in learned


def test_multimodal_gemma3_falls_to_the_generic_weight_only_path():
    """Gemma3ForConditionalGeneration (model_type "gemma3") has no entry: its language model's blocks
    are found generically (weight-only LWC)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {"vocab_size": TINY_VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    spec = get_arch(model)
    assert spec.weight_only and (spec.name, spec.backbone, spec.layers) == ("gemma3", "model.language_model", "layers")
    assert len(spec.linear_names) == 7
