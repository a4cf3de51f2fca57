"""compressed-tensors export: transformers loads it to the run's model, the integers read back exactly."""
from __future__ import annotations

import json

import pytest
import torch

import cli
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.export import ExportConfig, export_run
from omniquant_pl.quant.codes import load_block_codes

pytest.importorskip("compressed_tensors")

IDS = torch.randint(3, 384, (2, 48), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _run_model(run_dir, activation_bits=None):
    """The run's saved fake-quant model; with activation_bits, per-token quantization of every linear
    input (what compressed-tensors' dynamic activation scheme does; attention stays in float)."""
    from transformers import AutoModelForCausalLM

    from omniquant_pl.arch import get_arch
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.quant.activation_hooks import BlockActivationQuantizers

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    if activation_bits:
        spec = get_arch(model)
        for block in get_blocks(model, spec):
            BlockActivationQuantizers(block, spec, activation_bits)
    return model


def _load_export(folder, dequantize=False, **kwargs):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if dequantize:
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("symmetric,group_size", [(True, 0), (False, 16)])
def test_weight_only_export_loads_in_transformers_with_the_runs_logits(tmp_path, calibrated_run, symmetric, group_size):
    run = calibrated_run(wbits=4, group_size=group_size, symmetric=symmetric)
    report = export_run(run, ExportConfig(format="compressed-tensors", dtype="float32", output=str(tmp_path / "ct")))
    assert report["compression_format"] == "pack-quantized" and report["quantized_linears"] == 14
    assert report["ignored"] == ["lm_head"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (4, symmetric, "group" if group_size else "channel")
    assert "omniquant" not in config  # evaluate must not stack fake quantizers on the real ones
    # asymmetric checkpoints: transformers' default (compressed) path cannot take packed zero points
    # with compressed-tensors 0.20 (its meta compression leaves them unpacked); dequantize=True reads them
    exported = _load_export(tmp_path / "ct", dequantize=not symmetric)
    torch.testing.assert_close(_logits(exported), _logits(_run_model(run)), rtol=0, atol=0)


def test_runs_on_llama_cpps_symmetric_grid_export_exactly_with_float16_scales(tmp_path, calibrated_run):
    """quant.grid gguf keeps scales as fp16 values (negative where a row's largest weight is
    positive) and codes on [-8, 7]: compressed-tensors holds them exactly in float16."""
    run = calibrated_run(wbits=4, group_size=32, symmetric=True, grid="gguf")
    report = export_run(run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct")))
    assert report["exact"] and report["values_exact"]
    exported = _load_export(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        exported(input_ids=IDS[:, :4])  # compressed-tensors decompresses on the first forward
    reference = _run_model(run)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        assert torch.equal(exported.model.layers[1].get_submodule(name).weight,
                           reference.model.layers[1].get_submodule(name).weight)


def test_float16_scales_move_the_logits_only_by_the_scale_rounding(tmp_path, calibrated_run):
    run = calibrated_run(wbits=4, group_size=0, symmetric=True)
    export_run(run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct16")))
    assert json.loads((tmp_path / "ct16" / "config.json").read_text())["dtype"] == "float16"
    exported = _load_export(tmp_path / "ct16", dtype=torch.float32)  # fp16 tensors, computed in fp32
    reference = _logits(_run_model(run))
    difference = (_logits(exported) - reference).abs().max()
    # fp16 scales and norms carry 11 significant bits: each weight moves by <= 2^-11 relative; a wrong
    # code or zero point moves logits by whole quantization steps (>> 1e-2)
    assert 0 < difference < 1e-2 * reference.abs().max()


def test_integers_read_back_bit_for_bit(tmp_path, calibrated_run):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    run = calibrated_run(wbits=4, group_size=16, symmetric=False)
    export_run(run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct")))
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    for index in (0, 1):
        for name, codes in load_block_codes(run, index).items():
            prefix = f"model.layers.{index}.{name}"
            shape = tuple(stored[f"{prefix}.weight_shape"].tolist())
            assert shape == codes.shape
            # the layouts vLLM's WNA16 loader allocates: codes packed 8 per int32 along the input
            # dimension, zero points 8 per int32 along the output dimension, scales (out, groups)
            out, columns = shape
            groups = columns // 16
            assert stored[f"{prefix}.weight_packed"].shape == (out, columns // 8)
            assert stored[f"{prefix}.weight_zero_point"].shape == (out // 8, groups)
            assert stored[f"{prefix}.weight_packed"].dtype == stored[f"{prefix}.weight_zero_point"].dtype == torch.int32
            assert stored[f"{prefix}.weight_scale"].shape == (out, groups)
            assert stored[f"{prefix}.weight_shape"].dtype == torch.int64
            unpacked = unpack_from_int32(stored[f"{prefix}.weight_packed"], 4, torch.Size(shape))
            assert torch.equal(unpacked.to(torch.int16) + 8, codes.codes.to(torch.int16))
            zero = unpack_from_int32(stored[f"{prefix}.weight_zero_point"], 4, torch.Size(codes.scale.shape), packed_dim=0)
            assert torch.equal(zero.to(torch.int16) + 8, codes.zero.to(torch.int16))
            assert torch.equal(stored[f"{prefix}.weight_scale"], codes.scale.half())


def test_w8a8_export_is_the_runs_int8_weights_with_dynamic_token_activations(tmp_path, calibrated_run):
    run = calibrated_run(wbits=8, abits=8, symmetric=True, let=True)
    report = export_run(run, ExportConfig(format="compressed-tensors", dtype="float32", output=str(tmp_path / "ct")))
    assert report["compression_format"] == "int-quantized" and report["notes"]  # attention q/k/v: said so
    activations = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["input_activations"]
    assert (activations["num_bits"], activations["strategy"], activations["dynamic"]) == (8, "token", True)
    exported, reference = _logits(_load_export(tmp_path / "ct")), _logits(_run_model(run, activation_bits=8))
    # the same per-token int8 grid: equal logits, except where a value sits on a rounding tie that the two
    # implementations' arithmetic breaks differently (then one token's logits move by ~1e-4)
    same_tokens = (exported == reference).all(dim=-1).float().mean()
    assert same_tokens > 0.95
    torch.testing.assert_close(exported, reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize("quant,message", [
    (dict(wbits=3), "4- or 8-bit weights"),
    (dict(wbits=4, abits=4, let=True), "no inference engine serves W4A4"),
    (dict(wbits=8, abits=8, symmetric=False), "quant.symmetric true"),
    (dict(wbits=4, group_size=32, grid="gguf"), "integer zero points"),
])
def test_settings_no_engine_serves_are_refused_before_anything_is_written(tmp_path, calibrated_run, quant, message):
    with pytest.raises(ConfigError, match=message) as raised:
        export_run(calibrated_run(**quant), ExportConfig(format="compressed-tensors", output=str(tmp_path / "out")))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_saved_model_that_does_not_match_its_codes_is_refused(tmp_path, calibrated_run):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(calibrated_run(wbits=4, group_size=16), run)
    weights = load_file(run / "model" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, run / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OmniQuantError, match="does not equal the run's codes"):
        export_run(run, ExportConfig(format="compressed-tensors"))
    assert not (run / "export" / "compressed-tensors").exists()
    assert not list((run / "export").glob(".*.tmp"))  # the staging folder is gone too


def test_cli_export_and_its_one_line_errors(tmp_path, calibrated_run, capsys):
    run = calibrated_run(wbits=4, group_size=16)
    assert cli.main(["export", str(run), "--format", "compressed-tensors", "--output", str(tmp_path / "ct")]) == 0
    report = json.loads((tmp_path / "ct" / "export.json").read_text())
    assert report["quant"] == "W4A16g16" and report["run_dir"] == run.name
    assert "pack-quantized" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--output", str(tmp_path / "ct")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--format", "compressed-tensors"]) == 2
    assert "not an OmniQuant output directory" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--format", "onnx"]) == 2
    assert "available: compressed-tensors, gguf" in capsys.readouterr().err


def test_omniquant_evaluate_scores_an_asymmetric_export(tmp_path, calibrated_run):
    """The loader reads asymmetric exports de-quantized (transformers' compressed path cannot take
    packed zero points with compressed-tensors 0.20): the same perplexity as the run's model."""
    from omniquant_pl.config import EvalConfig, ModelConfig, QuantConfig
    from omniquant_pl.eval.runner import evaluate_target, resolve_target

    run = calibrated_run(wbits=4, group_size=16, symmetric=False)
    export_run(run, ExportConfig(format="compressed-tensors", dtype="float32", output=str(tmp_path / "ct")))
    cfg = EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=2, baselines=[])
    exported = evaluate_target(resolve_target(ModelConfig(str(tmp_path / "ct"))), cfg, [], QuantConfig(), torch.device("cpu"))
    original = evaluate_target(resolve_target(ModelConfig(str(run))), cfg, [], QuantConfig(), torch.device("cpu"))
    assert exported["perplexity"]["omniquant"]["pydoc"]["ppl"] == original["perplexity"]["omniquant"]["pydoc"]["ppl"]
    label = exported["methods"]["omniquant"]  # read from the export's files, not "W16A16 fp"
    assert label["bits"] == "W4A16g16" and label["format"] == "compressed-tensors pack-quantized"
    file_bytes = sum(p.stat().st_size for p in (tmp_path / "ct").glob("*.safetensors"))
    assert label["packed_bytes"] == label["disk_bytes"] == file_bytes
