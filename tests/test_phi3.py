"""Phi-3: fused q|k|v (self_attn.qkv_proj) and gate|up (mlp.gate_up_proj) rows described as data
(arch.base.FusedRows); every LET transform acts on the right rows, exactly, partial rotary included."""
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
from omniquant_pl.arch.base import FusedRows, LinearGroup
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import run_block
from omniquant_pl.let.params import LETParams
from omniquant_pl.quant.activation_hooks import use_quantized_attention

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 4, 2, 16, 128
Q_ROWS, KV_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # qkv_proj rows: q 0..63, k 64..95, v 96..127


def tiny_phi3(seed: int = 0, layers: int = 2, partial_rotary_factor: float = 1.0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=TINY_VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor},
    )
    return Phi3ForCausalLM(config).eval()


def _block_and_inputs(partial_rotary_factor=1.0, quantized_attention=False, dtype=torch.float64):
    model = tiny_phi3(layers=1, partial_rotary_factor=partial_rotary_factor).to(dtype)
    with torch.no_grad():  # q/k 4x: peaked attention, so a q/k scale that breaks RoPE shows plainly
        model.model.layers[0].self_attn.qkv_proj.weight[: Q_ROWS + KV_ROWS] *= 4
    if quantized_attention:
        use_quantized_attention(model)
    return capture_block(model)


def test_phi3_entry_describes_the_fused_rows():
    block, spec, _ = _block_and_inputs()
    assert spec.name == "phi3" and not spec.weight_only
    spec.check_block(block)  # every nn.Linear of the block is named, none is missing
    assert spec.attention_rows("q") == ("self_attn.qkv_proj", "q")
    assert spec.attention_rows("k") == ("self_attn.qkv_proj", "k")
    qkv, gate_up = (spec.fused_rows(n) for n in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
    assert qkv.sizes(Q_ROWS + 2 * KV_ROWS, HEADS, KV_HEADS, HEAD_DIM) == (1, (Q_ROWS, KV_ROWS, KV_ROWS))
    assert gate_up.sizes(2 * INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM) == (1, (INTERMEDIATE, INTERMEDIATE))
    # Falcon-40B style interleaving, (kv_heads, groups + 2, head_dim): q of kv head 1 is rows 64..95
    from omniquant_pl.let.params import AttentionGeometry
    from omniquant_pl.let.rows import replace_rows, take_rows

    falcon = FusedRows("qkv", (("q", "group"), ("k", "head"), ("v", "head")), repeat="kv_heads")
    rows = torch.arange(KV_HEADS * (HEADS // KV_HEADS + 2) * HEAD_DIM)
    geometry = AttentionGeometry(HEADS, KV_HEADS, HEAD_DIM)
    assert torch.equal(take_rows(rows, falcon, "q", geometry), torch.cat([torch.arange(0, 32), torch.arange(64, 96)]))
    assert torch.equal(take_rows(rows, falcon, "v", geometry), torch.cat([torch.arange(48, 64), torch.arange(112, 128)]))
    assert torch.equal(replace_rows(rows, falcon, "k", take_rows(rows, falcon, "k", geometry), geometry), rows)
    with pytest.raises(ValueError, match="do not split as"):
        qkv.sizes(Q_ROWS + KV_ROWS, HEADS, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="has no part 'w'"):
        dataclasses.replace(spec, out=LinearGroup("self_attn.qkv_proj", "self_attn.o_proj", source_rows="w"))


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.75], ids=["rotary", "partial-rotary"])
def test_let_with_quantization_off_is_exact_before_and_after_folding(partial_rotary_factor):
    """Every transform (norm->qkv/gate_up, v rows->o, up rows->down, q/k rows) at random
    non-trivial values: the block's function is unchanged, folded or not (float64)."""
    block, spec, captured = _block_and_inputs(partial_rotary_factor)
    let = LETParams(block, spec).double()
    rotary_dim = int(HEAD_DIM * partial_rotary_factor)
    assert let.geometry.rotary_dim == rotary_dim
    assert let.qk_param.shape == (KV_HEADS, rotary_dim // 2 + HEAD_DIM - rotary_dim)
    assert let.out_scale.shape == (KV_ROWS,) and let.down_scale.shape == (INTERMEDIATE,)
    _random_let(let)
    original = {n: p.detach().clone() for n, p in block.named_parameters()}
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        transformed = let.transformed(block)
        torch.testing.assert_close(block_output(block, transformed, captured), reference, rtol=1e-9, atol=1e-9)
        let.fold_into(block)
        torch.testing.assert_close(run_block(block, captured.hidden_states, captured.block_kwargs), reference,
                                   rtol=1e-9, atol=1e-9)
    # the scales landed on their rows: gate rows carry only the norm scale, up rows also 1/down_scale
    gate_up = transformed["mlp.gate_up_proj.weight"]
    fc1 = original["mlp.gate_up_proj.weight"] * let.fc1_scale.detach()
    torch.testing.assert_close(gate_up[:INTERMEDIATE], fc1[:INTERMEDIATE], rtol=1e-12, atol=0)
    torch.testing.assert_close(gate_up[INTERMEDIATE:], fc1[INTERMEDIATE:] / let.down_scale.detach()[:, None],
                               rtol=1e-12, atol=0)
    qkv = transformed["self_attn.qkv_proj.weight"]
    qkv_normed = original["self_attn.qkv_proj.weight"] * let.qkv_scale.detach()
    torch.testing.assert_close(qkv[Q_ROWS + KV_ROWS:], qkv_normed[Q_ROWS + KV_ROWS:] / let.out_scale.detach()[:, None],
                               rtol=1e-12, atol=0)


def _max_deviation(block, spec, captured, seed=0, rotary_dim=None):
    let = LETParams(block, spec).double()
    if rotary_dim is not None:
        let.geometry = dataclasses.replace(let.geometry, rotary_dim=rotary_dim)
        let.qk_param = torch.nn.Parameter(torch.ones(KV_HEADS, HEAD_DIM - rotary_dim // 2, dtype=torch.float64))
    _random_let(let, seed)
    with torch.no_grad():
        reference = run_block(block, captured.hidden_states, captured.block_kwargs)
        return (block_output(block, let.transformed(block), captured) - reference).abs().max().item()


def test_scales_on_the_wrong_rows_break_equivalence():
    """What the exactness test guards against: a v->o scale on the k rows, an up->down scale on
    the gate rows, a q/k scale that ignores partial rotary (or pairs channels as if all rotated)."""
    block, spec, captured = _block_and_inputs(partial_rotary_factor=0.75)
    assert _max_deviation(block, spec, captured) < 1e-9
    only = {"out": None, "up_down": None, "let_qk": False}
    wrong = {
        "v->o on k rows": dict(only, out=LinearGroup("self_attn.qkv_proj", "self_attn.o_proj", source_rows="k")),
        "up->down on gate rows": dict(only, out=spec.out, up_down=LinearGroup("mlp.gate_up_proj", "mlp.down_proj",
                                                                              source_rows="gate")),
        "q/k unpaired": dict(only, out=spec.out, let_qk=True, rotary_pairs=None),
    }
    for what, changes in wrong.items():
        deviation = _max_deviation(block, dataclasses.replace(spec, **changes), captured)
        assert deviation > 1e-4, (what, deviation)
    assert _max_deviation(block, spec, captured, rotary_dim=HEAD_DIM) > 1e-4  # partial rotary ignored


def _float_module(quant: QuantConfig, partial_rotary_factor=1.0):
    block, spec, captured = _block_and_inputs(partial_rotary_factor, quantized_attention=True, dtype=torch.float32)
    with torch.no_grad():
        full_precision = run_block(block, captured.hidden_states, captured.block_kwargs)
    module = BlockModule(block, 0, spec, captured.block_kwargs, quant, TrainConfig())
    return module, spec, captured, full_precision


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.75], ids=["rotary", "partial-rotary"])
def test_fused_block_equals_fake_quant_block_w4a4_with_let(partial_rotary_factor):
    module, spec, captured, full_precision = _float_module(QuantConfig(wbits=4, abits=4, group_size=16, let=True),
                                                           partial_rotary_factor)
    assert module.let.down_scale is not None and module.let.qk_param is not None
    fake_quant, fused, folded = fuse_with_random_parameters(module, captured)
    assert {type(fused.get_submodule(n)) for n in spec.linear_names} == {torch.nn.Linear}
    torch.testing.assert_close(folded, fake_quant, rtol=1e-5, atol=1e-5)
    assert (fake_quant - full_precision).abs().max() > 1e-3  # the quantization did something


def test_w4a4_hooks_quantize_every_linear_input_and_q_k_v(monkeypatch):
    """Each nn.Linear of the block sees per-token 4-bit inputs (<= 16 levels per token); the
    attention quantizes q (4 heads), k and v (2 kv heads) once per forward."""
    module, spec, captured, _ = _float_module(QuantConfig(wbits=4, abits=4, let=True))
    linears = list(module.quant_linears)  # every nn.Linear of the block (check_block), now a QuantLinear
    assert sorted(linears) == sorted(spec.linear_names) and len(linears) == 4
    check_w4a4_hooks(module, captured.hidden_states, monkeypatch,
                     [(2, HEADS, 24, HEAD_DIM), (2, KV_HEADS, 24, HEAD_DIM), (2, KV_HEADS, 24, HEAD_DIM)])


def test_w4a4_let_calibrates_end_to_end_and_resumes_to_the_same_result(tmp_path, tokenizer):
    learned = check_calibrates_and_resumes(tmp_path, tokenizer, tiny_phi3, blocks=2, stop_at=1)
    assert learned["layers.1.let.down_scale"].shape == (INTERMEDIATE,)
    assert learned["layers.1.let.out_scale"].shape == (KV_ROWS,)
