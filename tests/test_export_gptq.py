"""GPTQ-layout export: 2/3/4/8-bit runs packed as vLLM's gptq method reads them, read back exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cli
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.export import ExportConfig, export_run
from omniquant_pl.export.gptq_layout import GPTQTensors, dequantize_gptq, layout_problems, to_gptq
from omniquant_pl.quant.codes import QuantizedWeight, load_block_codes


def _engine_unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes as vLLM's reference GPTQ path reads them (independent of the exporter's packer): 2/4/8 bits
    are `(word >> (b·k)) & mask` for k < 32/b; 3 bits come in triples of words holding 32 codes, with code
    10 split 2 + 1 bits over words 0/1 and code 21 split 1 + 2 bits over words 1/2. Packed along axis 0."""
    words = words.astype(np.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if bits != 3:
        shifts = np.arange(0, 32, bits)
        codes = (words[:, None, :] >> shifts[None, :, None]) & mask  # (words, 32/b, cols)
        return codes.reshape(-1, words.shape[1])[:count]
    triples = words.reshape(-1, 3, words.shape[1])  # (groups of 32 codes, 3 words, cols)
    w0, w1, w2 = triples[:, 0], triples[:, 1], triples[:, 2]
    codes = [(w0 >> (3 * k)) & 7 for k in range(10)]
    codes.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    codes += [(w1 >> (3 * k + 1)) & 7 for k in range(10)]
    codes.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    codes += [(w2 >> (3 * k + 2)) & 7 for k in range(10)]
    return np.stack(codes, axis=1).reshape(-1, words.shape[1])[:count]  # (32·groups, cols)


def _random_weight(bits: int, symmetric: bool, out: int = 64, inp: int = 96, group: int = 32) -> QuantizedWeight:
    g = torch.Generator().manual_seed(bits)
    groups = inp // group
    if symmetric:
        half = 1 << (bits - 1)
        codes = torch.randint(-half + 1, half, (out, inp), generator=g).to(torch.int8)
        return QuantizedWeight(codes, torch.rand(out, groups, generator=g) + 0.1, None, bits)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g).to(torch.uint8)
    zero = torch.randint(1, 1 << bits, (out, groups), generator=g).to(torch.uint8)
    return QuantizedWeight(codes, torch.rand(out, groups, generator=g) + 0.1, zero, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_layout_is_what_the_engine_unpacks(bits, symmetric):
    weight = _random_weight(bits, symmetric)
    packed = to_gptq(weight)
    out, inp = weight.shape
    assert packed.qweight.shape == (inp * bits // 32, out) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (inp // 32, out * bits // 32) and packed.scales.dtype == torch.float16
    assert torch.equal(packed.g_idx, torch.arange(inp, dtype=torch.int32) // 32)
    codes = _engine_unpack(packed.qweight.numpy(), bits, inp)  # (in, out)
    zeros = _engine_unpack(packed.qzeros.numpy().T.copy(), bits, out).T + 1  # (groups, out), stored minus one
    offset = 0 if not symmetric else 1 << (bits - 1)
    assert np.array_equal(codes.T, weight.codes.numpy().astype(np.int64) + offset)
    expected_zero = np.full((out, inp // 32), offset) if symmetric else weight.zero.numpy()
    assert np.array_equal(zeros.T, expected_zero)
    engine = packed.scales.float()[packed.g_idx.long()] * (torch.from_numpy(codes) - torch.from_numpy(zeros)[packed.g_idx.long()])
    assert torch.equal(engine.T.float(), dequantize_gptq(packed, bits))
    rounded = QuantizedWeight(weight.codes, weight.scale.half().float(), weight.zero, bits)
    assert torch.equal(dequantize_gptq(packed, bits), rounded.dequantize())


def test_zero_point_zero_needs_v2_and_v2_stores_it():
    weight = _random_weight(4, False)
    zero = weight.zero.clone()
    zero[0, 0] = 0
    weight = QuantizedWeight(weight.codes, weight.scale, zero, 4)
    v1 = dequantize_gptq(to_gptq(weight, zero_offset=1), 4, zero_offset=1)
    v2 = dequantize_gptq(to_gptq(weight, zero_offset=0), 4, zero_offset=0)
    rounded = QuantizedWeight(weight.codes, weight.scale.half().float(), zero, 4).dequantize()
    assert torch.equal(v2, rounded) and not torch.equal(v1, rounded)  # the zero-minus-one convention wraps 0 to 2^b


def test_dimensions_the_bit_streams_cannot_fill_are_named():
    assert layout_problems(64, 96, 4) == []
    assert "in_features 80" in layout_problems(64, 80, 3)[0]
    assert "5-bit" in layout_problems(64, 64, 5)[0]


@pytest.mark.parametrize("quant", [dict(wbits=3, group_size=32), dict(wbits=2, symmetric=True),
                                   dict(wbits=4, group_size=16, symmetric=True, grid="gguf")])
def test_export_reads_back_as_the_runs_integers_and_scores_like_the_run(tmp_path, calibrated_run, quant):
    from omniquant_pl.config import EvalConfig, ModelConfig, QuantConfig
    from omniquant_pl.eval.runner import evaluate_target, resolve_target
    from omniquant_pl.export.gptq_layout import dequantized_state, read_gptq_config
    from omniquant_pl.models import load_model_and_tokenizer

    run = calibrated_run(**quant)
    folder = tmp_path / "gptq"
    report = export_run(run, ExportConfig(format="gptq", output=str(folder), dtype="float32"))
    assert report["exact"] and report["verified_tensors"] == report["quantized_linears"] == 14
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig == json.loads((folder / "quantize_config.json").read_text())
    assert (qconfig["quant_method"], qconfig["bits"], qconfig["sym"]) == ("gptq", quant["wbits"], quant.get("symmetric", False))
    assert qconfig["group_size"] == (quant.get("group_size") or -1) and qconfig["desc_act"] is False
    state = dequantized_state(folder, read_gptq_config(folder), torch.float32)
    for block in range(2):
        for name, weight in load_block_codes(run, block).items():
            rounded = QuantizedWeight(weight.codes, weight.scale.half().float(), weight.zero, weight.bits)
            assert torch.equal(state[f"model.layers.{block}.{name}.weight"], rounded.dequantize())
    # evaluate loads it (de-quantized), labels it by its files, and scores it like the run's model
    cfg = EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=2, baselines=[])
    exported = evaluate_target(resolve_target(ModelConfig(str(folder))), cfg, [], QuantConfig(), torch.device("cpu"))
    original = evaluate_target(resolve_target(ModelConfig(str(run))), cfg, [], QuantConfig(), torch.device("cpu"))
    ppl, reference = (r["perplexity"]["omniquant"]["pydoc"]["ppl"] for r in (exported, original))
    assert ppl == reference if report["values_exact"] else ppl == pytest.approx(reference, rel=1e-3)
    label = exported["methods"]["omniquant"]
    assert label["format"] == f"GPTQ ({report['checkpoint_format']})" and label["bits"].startswith(f"W{quant['wbits']}A16")
    model, _ = load_model_and_tokenizer(ModelConfig(str(folder)), torch.device("cpu"))
    assert not hasattr(model.config, "quantization_config")


def test_settings_the_layout_cannot_hold_are_refused_in_one_line(tmp_path, calibrated_run, capsys):
    run = calibrated_run(wbits=4, group_size=16, grid="gguf")  # asymmetric gguf grid: a real-valued minimum
    with pytest.raises(ConfigError, match="integer zero points"):
        export_run(run, ExportConfig(format="gptq", output=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()
    run = calibrated_run(wbits=4, abits=8)
    assert cli.main(["export", str(run), "--format", "gptq", "--output", str(tmp_path / "b")]) == 2
    assert "weight-only" in capsys.readouterr().err


def test_a_damaged_file_is_caught_by_the_read_back(tmp_path, calibrated_run, monkeypatch):
    import omniquant_pl.export.gptq as exporter

    original = exporter.to_gptq

    def off_by_one(weight, zero_offset=1):
        packed = original(weight, zero_offset)
        return GPTQTensors(packed.qweight ^ 1, packed.qzeros, packed.scales, packed.g_idx)

    monkeypatch.setattr(exporter, "to_gptq", off_by_one)
    with pytest.raises(OmniQuantError, match="do not hold the run's integers"):
        export_run(calibrated_run(wbits=3, group_size=32), ExportConfig(format="gptq", output=str(tmp_path / "g")))
    assert not (tmp_path / "g").exists()
