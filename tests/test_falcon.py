"""Falcon: one entry, its block layouts picked by config (7B: parallel attention on one shared
LayerNorm, multi-query; 40B/180B: ln_attn and ln_mlp, grouped kv heads interleaved per kv head;
11B: that grouping on one shared norm; RW: sequential, ALiBi, biases), the q|k|v rows of
query_key_value as data, and q/k/v quantized inside the torch SDPA call of Falcon's sdpa path.

The references are what the installed transformers computes: q/k/v are read where its attention
hands them to torch's scaled_dot_product_attention (transformers <= 5.24 calls it in Falcon's own
forward with k/v already repeated per query head for 40B; 5.25 dispatches through the attention
interface, whose sdpa function repeats multi-query/grouped k/v or passes them with enable_gqa)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB
from family_checks import (
    block_output,
    capture_block,
    check_calibrates_and_resumes,
    check_w4a4_hooks,
    fuse_with_random_parameters,
)
from test_let import _random_let
from torch.overrides import TorchFunctionMode

from omniquant_pl import QuantConfig, TrainConfig
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.base import FusedRows, LinearGroup, NormGroup
from omniquant_pl.arch.registry import get_arch_for_config, get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import capture_block_inputs, run_block
from omniquant_pl.errors import AttentionNotQuantizedError
from omniquant_pl.let.params import LETParams
from omniquant_pl.let.rows import take_rows
from omniquant_pl.quant.activation_hooks import BlockActivationQuantizers, use_quantized_attention

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16
QKV, DENSE, H_TO_4H = "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h"
LAYOUTS = {  # layout: (FalconConfig fields, kv heads)
    "7b": ({"new_decoder_architecture": False, "parallel_attn": True, "multi_query": True}, 1),
    "40b": ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2),
    "11b": ({"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}, 2),  # one shared norm
    "rw": ({"new_decoder_architecture": False, "parallel_attn": False, "multi_query": False, "alibi": True,
            "bias": True}, 4),
}


def tiny_falcon(layout: str = "7b", seed: int = 0, layers: int = 2, attn_implementation: str = "sdpa"):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                          num_attention_heads=HEADS, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                          **LAYOUTS[layout][0])
    config._attn_implementation = attn_implementation
    model = FalconForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms and biases away from 1 and 0: a transform that drops one shows
        for name, param in model.transformer.h.named_parameters():
            if name.endswith("bias") or "ln" in name or "layernorm" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


class _RecordSDPA(TorchFunctionMode):
    """Records the q, k and v of every torch scaled_dot_product_attention call ((B, heads, T, head_dim))."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = [kwargs[name] for name in ("query", "key", "value")[len(args[:3]):]]
            self.calls.append(tuple(t.detach().clone() for t in (*args[:3], *named)))
        return func(*args, **kwargs)


def sdpa_inputs(block, hidden_states, block_kwargs, identity_rotary: bool = False):
    """The q, k, v the installed transformers passes to torch SDPA in one call of `block` (checks it
    is one call). identity_rotary: cos 1 and sin 0, so q/k are the rows query_key_value wrote."""
    kwargs = dict(block_kwargs)
    if identity_rotary and kwargs.get("position_embeddings") is not None:
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
    with _RecordSDPA() as recorder, torch.no_grad():
        run_block(block, hidden_states, kwargs)
    assert len(recorder.calls) == 1, f"{len(recorder.calls)} SDPA calls in one block forward"
    return recorder.calls[0]


def _as_query_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v with one head per query head ((B, kv heads, T, d) -> (B, heads, T, d)); each kv head
    serves its contiguous group of query heads (enable_gqa's and repeat_kv's order)."""
    return kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _block_and_inputs(layout, dtype=torch.float64):
    model = tiny_falcon(layout, layers=1).to(dtype)
    with torch.no_grad():  # q/k 4x: peaked attention, so a q/k scale that breaks RoPE shows plainly
        model.transformer.h[0].self_attention.query_key_value.weight.mul_(4)
    return capture_block(model)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_falcon_entry_resolves_each_layout_and_its_rows_match_the_models_q_k_v(layout):
    block, spec, captured = _block_and_inputs(layout)
    spec.check_block(block)  # every nn.Linear of the block is named, none is missing
    assert spec == get_arch_for_config(tiny_falcon(layout, layers=1).config)  # export resolves it alike
    norms = {"7b": ("input_layernorm", None), "11b": ("input_layernorm", None), "40b": ("ln_attn", "ln_mlp"),
             "rw": ("input_layernorm", "post_attention_layernorm")}
    assert (spec.qkv.norm, spec.fc1 and spec.fc1.norm) == norms[layout]
    assert spec.linear_names[:2] == ((QKV, DENSE) if spec.fc1 else (QKV, H_TO_4H))
    assert (spec.rotary_pairs, spec.let_shifts) == ((None, True) if layout == "rw" else ("half", False))
    let = LETParams(block, spec)
    assert (let.geometry.heads, let.geometry.kv_heads, let.geometry.head_dim) == (HEADS, LAYOUTS[layout][1], HEAD_DIM)
    # the rows each part names are the q, k and v the model's own attention hands to SDPA (rotary
    # off, so q/k are exactly what query_key_value wrote), read off the installed transformers
    attention = block.self_attention
    normed = {}

    def record_input(module, args, kwargs):  # the normed hidden states the attention reads
        normed["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = attention.register_forward_pre_hook(record_input, with_kwargs=True)
    model_qkv = sdpa_inputs(block, captured.hidden_states, captured.block_kwargs, identity_rotary=True)
    handle.remove()
    linear, layout_rows = attention.query_key_value, spec.fused_rows(QKV)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.float64)
    for name, from_model in zip("qkv", model_qkv):
        rows = [take_rows(tensor, layout_rows, name, let.geometry) for tensor in (linear.weight, bias)]
        part = torch.nn.functional.linear(normed["x"], *rows).unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2)
        assert part.shape[1] == (HEADS if name == "q" else LAYOUTS[layout][1])  # (B, heads or kv heads, T, head_dim)
        if from_model.shape[1] > part.shape[1]:  # the model repeated each kv head over its query group
            part = _as_query_heads(part, from_model.shape[1])
        torch.testing.assert_close(part, from_model, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_let_with_quantization_off_is_exact_before_and_after_folding(layout):
    """Every transform (norm->qkv (and dense_h_to_4h), v rows->dense, q/k rows, shifts where the
    linears have biases) at random non-trivial values: the block's function is unchanged (float64)."""
    block, spec, captured = _block_and_inputs(layout)
    let = LETParams(block, spec).double()
    kv_rows = LAYOUTS[layout][1] * HEAD_DIM
    assert let.out_scale.shape == (kv_rows,) and let.down_scale is None  # a GELU MLP: no up->down
    assert (let.fc1_scale is None) == (spec.fc1 is None)  # 7B/11B: one scale for both linears of the shared norm
    _random_let(let)
    original = {n: p.detach().clone() for n, p in block.named_parameters()}
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        transformed = let.transformed(block)
        torch.testing.assert_close(block_output(block, transformed, captured), reference, rtol=1e-9, atol=1e-9)
        let.fold_into(block)
        torch.testing.assert_close(run_block(block, captured.hidden_states, captured.block_kwargs), reference,
                                   rtol=1e-9, atol=1e-9)
    # the scales landed: the MLP's input columns carry the norm scale of its group; v rows 1/out_scale
    mlp_scale = let.qkv_scale if spec.fc1 is None else let.fc1_scale
    torch.testing.assert_close(transformed[f"{H_TO_4H}.weight"], original[f"{H_TO_4H}.weight"] * mlp_scale.detach(),
                               rtol=1e-12, atol=0)
    v_rows = take_rows(transformed[f"{QKV}.weight"], spec.fused_rows(QKV), "v", let.geometry)
    normed = take_rows(original[f"{QKV}.weight"] * let.qkv_scale.detach(), spec.fused_rows(QKV), "v", let.geometry)
    torch.testing.assert_close(v_rows, normed / let.out_scale.detach()[:, None], rtol=1e-12, atol=0)


def _max_deviation(block, spec, captured, seed=0):
    let = LETParams(block, spec).double()
    _random_let(let, seed)
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        return (block_output(block, let.transformed(block), captured) - reference).abs().max().item()


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_scales_on_the_wrong_rows_break_equivalence(layout):
    """What the exactness test guards against: a v->dense scale on the k rows, q|k|v read as
    contiguous blocks (Phi-3's layout) instead of per kv head, an unpaired q/k scale under RoPE, and
    (7B) the shared norm's scale folded into query_key_value only."""
    block, spec, captured = _block_and_inputs(layout)
    assert _max_deviation(block, spec, captured) < 1e-9
    only_out = {"let_qk": False}
    wrong = {
        "v->dense on k rows": dict(only_out, out=LinearGroup(QKV, DENSE, source_rows="k")),
        "q/k unpaired": {"rotary_pairs": None},
    }
    if layout == "40b":  # with one kv head (7B) the two layouts coincide
        contiguous = FusedRows(QKV, (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")))
        wrong["contiguous q|k|v"] = {"fused": (contiguous,)}
    else:
        wrong["norm into qkv only"] = {"qkv": NormGroup("input_layernorm", (QKV,))}
    for what, changes in wrong.items():
        deviation = _max_deviation(block, dataclasses.replace(spec, **changes), captured)
        assert deviation > 1e-4, (what, deviation)


def _float_module(quant: QuantConfig, layout: str):
    block, spec, captured = _block_and_inputs(layout, dtype=torch.float32)
    with torch.no_grad():
        full_precision = run_block(block, captured.hidden_states, captured.block_kwargs)
    module = BlockModule(block, 0, spec, captured.block_kwargs, quant, TrainConfig())
    return module, spec, captured, full_precision


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_fused_block_equals_fake_quant_block_w4a4_with_let(layout):
    quant = QuantConfig(wbits=4, abits=4, group_size=16, let=True)
    module, spec, captured, full_precision = _float_module(quant, layout)
    assert module.let.qk_param is not None
    fake_quant, fused, folded = fuse_with_random_parameters(module, captured)
    assert {type(fused.get_submodule(n)) for n in spec.linear_names} == {torch.nn.Linear}
    assert module.act_quantizers.qkv_calls == 1  # the fused block's SDPA call is wrapped again
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)
    assert (fake_quant - full_precision).abs().max() > 1e-3  # the quantization did something


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_w4a4_hooks_quantize_every_linear_input_and_q_k_v(monkeypatch, layout):
    """Each nn.Linear of the block sees per-token 4-bit inputs (<= 16 levels per token); q, k and v
    of the SDPA call of Falcon's sdpa path are quantized once per forward, after RoPE, in the shapes
    the installed transformers hands to SDPA."""
    module, _, captured, _ = _float_module(QuantConfig(wbits=4, abits=4, let=True), layout)
    assert sorted(module.quant_linears) == sorted([QKV, DENSE, H_TO_4H, "mlp.dense_4h_to_h"])
    module.act_quantizers.quantizer.enabled = False
    shapes = [tuple(t.shape) for t in sdpa_inputs(module.block, captured.hidden_states, captured.block_kwargs)]
    module.act_quantizers.quantizer.enabled, module.act_quantizers.qkv_calls = True, 0
    assert shapes[0] == (2, HEADS, 24, HEAD_DIM) and shapes[1] == shapes[2]
    assert shapes[1][1] in (LAYOUTS[layout][1], HEADS)  # k/v per kv head, or repeated per query head
    check_w4a4_hooks(module, captured.hidden_states, monkeypatch, shapes)
    module.act_quantizers.remove()
    assert "forward" not in module.block.self_attention.__dict__  # the class's forward again


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_q_k_v_reach_sdpa_quantized_exactly_once_per_call(layout):
    """With only the q/k/v quantizer installed: one forward makes one SDPA call, counted once, and
    the q, k, v that reach it are the 4-bit per-token, per-head quantization of the ones the
    model computes without it (quantized once: each of the three tensors through the quantizer)."""
    block, spec, captured = _block_and_inputs(layout, dtype=torch.float32)
    reference = sdpa_inputs(block, captured.hidden_states, captured.block_kwargs)
    installed = BlockActivationQuantizers(block, spec, 4, linears=False)
    try:
        with installed.expect_qkv_quantized("block 0"):
            quantized = sdpa_inputs(block, captured.hidden_states, captured.block_kwargs)
        assert installed.qkv_calls == 1
        for got, plain in zip(quantized, reference):
            torch.testing.assert_close(got, installed.quantizer(plain), rtol=0, atol=0)
            assert max(len(torch.unique(row)) for row in got.reshape(-1, HEAD_DIM)) <= 16
            assert (got - plain).abs().max() > 1e-4
    finally:
        installed.remove()


@pytest.mark.parametrize("layout", ["7b", "rw"])
def test_wrapped_sdpa_keeps_the_models_masks_and_quantizes_every_block(layout):
    """A left-padded batch through the whole model: with the q/k/v quantizer switched off the
    wrapped attention gives the model's own logits (its padding mask; RW's ALiBi bias, carried in
    that mask), and every block's SDPA call went through it; switched on, the logits move."""
    model = tiny_falcon(layout)
    spec = get_arch(model)
    use_quantized_attention(model)
    input_ids = torch.randint(3, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        installed = [BlockActivationQuantizers(block, spec, 4, linears=False) for block in get_blocks(model, spec)]
        for quantizers in installed:
            quantizers.quantizer.enabled = False
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert [quantizers.qkv_calls for quantizers in installed] == [1, 1]
        for quantizers in installed:
            quantizers.quantizer.enabled = True
        quantized = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-6, atol=1e-6)
    assert (quantized[real] - expected[real]).abs().max() > 1e-3


def test_eager_falcon_attention_is_refused_and_an_unwrapped_call_fails_loudly():
    eager = tiny_falcon(layers=1, attn_implementation="eager")
    with pytest.raises(AttentionNotQuantizedError, match="its attention runs 'eager'") as err:
        use_quantized_attention(eager)
    assert "\n" not in str(err.value) and "--model.attn_implementation sdpa" in str(err.value)
    spec = get_arch(eager)  # never routed: its attention skips SDPA, so the quantizer never runs
    captured = capture_block_inputs(eager, spec, torch.randint(0, TINY_VOCAB, (2, 16)))
    module = BlockModule(get_blocks(eager, spec)[0], 0, spec, captured.block_kwargs, QuantConfig(wbits=4, abits=4),
                         TrainConfig())
    with torch.no_grad(), pytest.raises(AttentionNotQuantizedError, match="runs 'eager', not 'sdpa'"):
        module(captured.hidden_states)


def test_eager_attention_with_activation_quantization_is_refused_before_loading(tmp_path, tokenizer):
    """Only the config is read: the refusal names the fix before any weight loads."""
    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, RunConfig
    from omniquant_pl.errors import ConfigError
    from omniquant_pl.preflight import check_run

    tiny_falcon(layers=1).save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")

    def run(attn_implementation, abits):
        return RunConfig(model=ModelConfig(str(tmp_path / "falcon"), attn_implementation=attn_implementation),
                         quant=QuantConfig(wbits=4, abits=abits), calib=CalibConfig(source="pydoc", nsamples=2, seqlen=16),
                         eval=EvalConfig(datasets=["pydoc"], seqlen=16), output_dir=str(tmp_path / "out"))

    with pytest.raises(ConfigError, match="model.attn_implementation is 'eager'; use --model.attn_implementation sdpa"):
        check_run(run("eager", 4))
    check_run(run("eager", 16))  # weight-only never quantizes q/k/v
    check_run(run(None, 4))
    check_run(run("sdpa", 4))


def test_compiled_block_quantizes_q_k_v_as_the_eager_one():
    """torch.compile traces the TorchFunctionMode around Falcon's SDPA call: the compiled block
    (the training step's graph, here with the aot_eager backend) computes what the eager one does."""
    module, _, captured, full_precision = _float_module(QuantConfig(wbits=4, abits=4, let=True), "40b")
    _random_let(module.let, seed=3)
    with torch.no_grad():
        eager = module(captured.hidden_states)
        compiled = torch.compile(module._block_forward, backend="aot_eager")(captured.hidden_states)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (eager - full_precision).abs().max() > 1e-3


def test_w4a4_let_calibrates_end_to_end_and_resumes_to_the_same_result(tmp_path, tokenizer):
    learned = check_calibrates_and_resumes(tmp_path, tokenizer, lambda: tiny_falcon("7b"), blocks=2, stop_at=1)
    assert learned["layers.1.let.out_scale"].shape == (HEAD_DIM,)  # multi-query: one kv head
    assert "layers.1.let.fc1_scale" not in learned  # the shared norm has one scale


def test_a_variant_is_checked_when_the_table_is_built():
    from omniquant_pl.arch.base import ConfigVariant
    from omniquant_pl.arch.tables import FALCON

    alibi = (("alibi", (True,)),)
    with pytest.raises(ValueError, match=r"variants change \['name'\]"):
        dataclasses.replace(FALCON, variants=(ConfigVariant(alibi, (("name", "falcon-rw"),)),))
    with pytest.raises(ValueError, match="has no part 'w'"):  # a variant alone must give a valid spec
        dataclasses.replace(FALCON, variants=(ConfigVariant(alibi, (("out", LinearGroup(QKV, DENSE, "w")),)),))
