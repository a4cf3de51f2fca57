"""GGUF export: exact block types read back in transformers and scored by llama.cpp itself."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from omniquant_pl.errors import ConfigError
from omniquant_pl.export import ExportConfig, export_run
from omniquant_pl.export.gguf_blocks import EXACT_TYPES, expected_dequantized, pack_blocks
from omniquant_pl.quant import WeightQuantizer
from omniquant_pl.quant.codes import QuantizedWeight, load_block_codes
from omniquant_pl.versions import software_versions

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

# runs on each exact type's grid, llama.cpp's own (quant.grid gguf)
GRIDS = {name: dict(wbits=t.bits, symmetric=t.symmetric, group_size=32, grid="gguf") for name, t in EXACT_TYPES.items()}
# llama.cpp quantizes activations to 8-bit blocks of 32 (Q8_0/Q8_1) for its quantized dot products, keeps
# the KV cache in fp16 and sums in another order: measured up to 3.2e-3 nats per window (Q4_1) on the
# test model, 1.5e-3 on average. A wrong rope row order moves the windows by 3.6e-2 on average (at least
# 1.2e-2 each, measured), a wrong nibble order, zero point or scale by more. Checked: the mean over the
# windows within MEAN_TOLERANCE, each window within MAX_TOLERANCE (room for other CPUs' kernels).
MEAN_TOLERANCE, MAX_TOLERANCE = 5e-3, 1e-2


@pytest.fixture(scope="module")
def bf16_valued_llama(tmp_path_factory, tokenizer):
    """A tiny Llama whose weights are bf16 values (many exact ties for rounding), with an all-zero
    block and a block whose largest magnitudes tie between signs; and a folder with its tokenizer."""
    from conftest import tiny_llama

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    model = tiny_llama()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
        down = model.model.layers[0].mlp.down_proj.weight
        down[0, :32] = 0
        down[1, 0], down[1, 1] = 0.25, -0.25
    return model, folder


@pytest.mark.parametrize("type_name", sorted(EXACT_TYPES))
def test_rtn_on_the_gguf_grid_is_llama_cpps_own_quantizer_byte_for_byte(tmp_path, bf16_valued_llama, type_name):
    """Unclipped, quant.grid gguf rounds every weight exactly as llama.cpp's quantizer
    (llama_model_quantize on an F32 file) does: what OmniQuant adds is only what it learns."""
    from omniquant_pl.export.gguf import model_to_gguf

    model, tokenizer_folder = bf16_valued_llama
    path = tmp_path / f"{type_name}.gguf"
    model_to_gguf(model, path, type_name, tokenizer_folder=tokenizer_folder)
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    exact = EXACT_TYPES[type_name]
    for index in (0, 1):
        for hf_name, gguf_name in (("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"), ("self_attn.v_proj", "attn_v")):
            weight = model.model.layers[index].get_submodule(hf_name).weight.detach()
            rtn = WeightQuantizer(tuple(weight.shape), exact.bits, 32, exact.symmetric, learnable_clipping=False, gguf_grid=True)
            tensor = stored[f"blk.{index}.{gguf_name}.weight"]
            assert tensor.tensor_type.name == type_name
            assert np.array_equal(pack_blocks(type_name, rtn.quantize(weight)), np.asarray(tensor.data).reshape(weight.shape[0], -1))


@pytest.mark.parametrize("type_name", sorted(EXACT_TYPES))
def test_block_bytes_decode_to_the_runs_grid_in_the_gguf_package(type_name):
    exact = EXACT_TYPES[type_name]
    torch.manual_seed(0)
    quantizer = WeightQuantizer((48, 96), exact.bits, 32, exact.symmetric, gguf_grid=True)
    with torch.no_grad():
        quantizer.upper_logit.uniform_(0, 4)
        quantizer.lower_logit.uniform_(0, 4)
    codes = quantizer.quantize(torch.randn(48, 96) * torch.rand(48, 1))
    raw = pack_blocks(type_name, codes)
    decoded = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name))
    # on llama.cpp's grid, d and m already are fp16 values: the file decodes to the run's values
    assert np.array_equal(decoded, codes.dequantize().numpy())


@pytest.mark.parametrize("type_name", sorted(EXACT_TYPES))
def test_min_max_runs_map_exactly_up_to_fp16_scales(type_name):
    exact = EXACT_TYPES[type_name]
    torch.manual_seed(0)
    quantizer = WeightQuantizer((48, 96), exact.bits, 32, exact.symmetric)
    codes = quantizer.quantize(torch.randn(48, 96) * torch.rand(48, 1))
    decoded = gguf.quants.dequantize(pack_blocks(type_name, codes), getattr(gguf.GGMLQuantizationType, type_name))
    assert np.array_equal(decoded, expected_dequantized(codes).numpy())
    error = (torch.from_numpy(decoded) - codes.dequantize()).abs().max()  # only d (and m) rounded to fp16
    assert error <= codes.scale.max() * 2**-11 * 2 ** (exact.bits + 1)


def _gguf_file(folder: Path) -> Path:
    return next(folder.glob("*.gguf"))


def _export(run, tmp_path, type_name, **options) -> tuple[dict, Path]:
    report = export_run(run, ExportConfig(format="gguf", gguf_type=type_name, output=str(tmp_path / type_name), **options))
    return report, _gguf_file(tmp_path / type_name)


def _transformers_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("type_name,grid", [(name, "gguf") for name in sorted(EXACT_TYPES)]
                         + [("Q4_1", "minmax"), ("Q4_0", "minmax")])
def test_exact_export_reads_back_in_transformers_as_the_runs_integers(tmp_path, calibrated_run, type_name, grid):
    run = calibrated_run(**dict(GRIDS[type_name], grid=grid))  # min-max grids map exactly too
    report, path = _export(run, tmp_path, type_name)
    assert report["mode"] == "exact" and report["exact_tensors"] == 14
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert all(t == type_name for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight"))
    assert types["output.weight"] == "Q8_0"  # llama.cpp's default for a 64-wide output
    model = _transformers_model(path)
    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    for index in (0, 1):
        for name, codes in load_block_codes(run, index).items():
            read_back = model.model.layers[index].get_submodule(name).weight
            assert torch.equal(read_back, expected_dequantized(codes)), name
            if grid == "gguf":  # the file holds exactly the weights the run evaluated
                assert torch.equal(read_back, saved.model.layers[index].get_submodule(name).weight), name


def _reference_model(run: Path, gguf_model):
    """The run's saved model with exactly what the GGUF stores: block linears = the run's codes with d
    (and m) in fp16, embeddings and head = llama.cpp's quantization of them (as transformers decodes)."""
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    with torch.no_grad():
        for index in (0, 1):
            for name, codes in load_block_codes(run, index).items():
                model.model.layers[index].get_submodule(name).weight.copy_(expected_dequantized(codes))
        model.model.embed_tokens.weight.copy_(gguf_model.model.embed_tokens.weight)
        model.lm_head.weight.copy_(gguf_model.lm_head.weight)
    return model


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_llama_cpp_scores_the_export_like_the_runs_model(tmp_path, calibrated_run, type_name):
    from omniquant_pl.eval.llama_cpp import gguf_perplexity
    from omniquant_pl.eval.perplexity import window_mean_nll

    run = calibrated_run(**GRIDS[type_name])
    _, path = _export(run, tmp_path, type_name)
    ids = torch.randint(3, 384, (4 * 64,), generator=torch.Generator().manual_seed(1))
    llama_cpp_nll = torch.tensor(gguf_perplexity(path, ids, 64)["window_nll"])
    reference = _reference_model(run, _transformers_model(path))
    with torch.no_grad():
        torch_nll = window_mean_nll(reference(input_ids=ids.view(4, 64)).logits, ids.view(4, 64)).double()
    difference = (llama_cpp_nll - torch_nll).abs()
    assert difference.mean() < MEAN_TOLERANCE and difference.max() < MAX_TOLERANCE, (llama_cpp_nll, torch_nll)


def test_grid_mismatch_is_refused_unless_requantized_and_then_said_to_be_approximate(tmp_path, calibrated_run):
    run = calibrated_run(wbits=4, group_size=16)
    with pytest.raises(ConfigError, match=r"gguf-q4_0\.yaml.*--requantize") as raised:
        export_run(run, ExportConfig(format="gguf", gguf_type="Q4_0", output=str(tmp_path / "refused")))
    assert "\n" not in str(raised.value) and not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match="not an exact target.*--requantize"):
        export_run(run, ExportConfig(format="gguf", gguf_type="Q3_K_M", output=str(tmp_path / "refused")))
    report, path = _export(run, tmp_path, "Q3_K", requantize=True)
    assert report["mode"] == "requantize" and not report["exact"]
    assert any("APPROXIMATE" in note for note in report["notes"])
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["omniquant.approximate"].contents() is True and fields["omniquant.exact"].contents() is False
    # llama.cpp runs it like transformers reads it (the same re-rounded weights)
    from omniquant_pl.eval.llama_cpp import gguf_perplexity
    from omniquant_pl.eval.perplexity import window_mean_nll

    ids = torch.randint(3, 384, (128,), generator=torch.Generator().manual_seed(2))
    llama_cpp_nll = torch.tensor(gguf_perplexity(path, ids, 64)["window_nll"])
    with torch.no_grad():
        torch_nll = window_mean_nll(_transformers_model(path)(input_ids=ids.view(2, 64)).logits, ids.view(2, 64))
    difference = (llama_cpp_nll - torch_nll.double()).abs()
    assert difference.mean() < MEAN_TOLERANCE and difference.max() < MAX_TOLERANCE


def test_weight_activation_runs_and_other_families_are_refused(tmp_path, calibrated_run):
    with pytest.raises(ConfigError, match="weight-only"):
        export_run(calibrated_run(wbits=8, abits=8, symmetric=True, let=True),
                   ExportConfig(format="gguf", gguf_type="Q8_0", output=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        export_run(calibrated_run(**GRIDS["Q4_0"]), ExportConfig(format="gguf", gguf_type="Q4_2", output=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="needs --gguf_type"):
        export_run(calibrated_run(**GRIDS["Q4_0"]), ExportConfig(format="gguf", output=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_float_export_holds_the_fused_weights(tmp_path, calibrated_run):
    run = calibrated_run(wbits=3, group_size=16)
    report, path = _export(run, tmp_path, "F32")
    assert report["mode"] == "float"
    model = _transformers_model(path)
    codes = load_block_codes(run, 1)["self_attn.k_proj"]
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, codes.dequantize())
    written = json.loads((tmp_path / "F32" / "export.json").read_text())
    assert written["gguf_type"] == "F32"
    assert written["versions"] == software_versions(optional=("compressed-tensors", "gguf", "llama-cpp-python"))
    assert written["versions"]["gguf"]  # the writer's library is named with the stack


def test_rope_rows_follow_their_codes():
    """q/k rows are reordered for llama.cpp's rope; each row keeps its own codes, scales and zero point."""
    from omniquant_pl.export.gguf_model import rope_interleave_rows

    rows = torch.arange(16).view(16, 1)  # 2 heads of head_dim 8
    assert rope_interleave_rows(rows, 2).view(-1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    codes = QuantizedWeight(torch.arange(32, dtype=torch.uint8).view(16, 2), torch.rand(16, 1), None, 4)
    moved = QuantizedWeight(rope_interleave_rows(codes.codes, 2), rope_interleave_rows(codes.scale, 2), None, 4)
    assert torch.equal(moved.dequantize(), rope_interleave_rows(codes.dequantize(), 2))


def test_llama_cpp_check_scores_the_export_next_to_llama_cpps_own_quantizer(tmp_path, tiny_model_dir, capsys):
    """The main job's callback, named in YAML: before calibration it writes llama.cpp's own Q4_0 of the
    still unquantized model; after the run it exports the run exactly, scores both files in llama.cpp on
    the evaluation windows, generates from the export, and the summary prints it all."""
    pytest.importorskip("llama_cpp")
    import yaml

    import cli
    from omniquant_pl.export.llama_cpp import quantize_gguf  # noqa: F401  (llama.cpp is importable)
    from omniquant_pl.results import read_results

    if "opt" in tiny_model_dir.name:
        pytest.skip("GGUF export covers the LLaMA family")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "quant": GRIDS["Q4_0"],
        "calib": {"source": "pydoc", "nsamples": 4, "seqlen": 64}, "train": {"epochs": 1, "keep_best_rtn": True},
        "eval": {"datasets": ["pydoc"], "seqlen": 64, "max_windows": 2, "baselines": ["fp"]},
        "output_dir": str(tmp_path / "out"),
        "trainer": {"callbacks": [{"class_path": "callbacks.llama_cpp.LlamaCppCheck",
                                   "init_args": {"gguf_type": "Q4_0", "prompt": "The", "max_tokens": 4}}]},
    }))
    assert cli.main(["calibrate", "--config", str(config)]) == 0
    check = read_results(tmp_path / "out" / "results.json").llama_cpp
    assert check["gguf_type"] == "Q4_0" and check["dataset"] == "pydoc" and check["seqlen"] == 64
    ours, theirs = check["rows"]["OmniQuant export"], check["rows"]["llama.cpp quantizer"]
    assert (tmp_path / "out" / theirs["file"]).is_file() and (tmp_path / "out" / ours["file"]).is_file()
    assert ours["windows"] == theirs["windows"] == 2 and 1 < ours["ppl"] < 1e4 and 1 < theirs["ppl"] < 1e4
    assert isinstance(check["generation"]["text"], str)
    printed = capsys.readouterr().out
    assert "llama.cpp quantizer" in printed and "OmniQuant vs llama.cpp's own Q4_0" in printed


def test_llama_cpp_check_refuses_a_grid_that_does_not_store_as_its_type_before_loading(tmp_path, tiny_model_dir,
                                                                                        capsys, monkeypatch):
    import yaml

    import cli

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "quant": {"wbits": 3, "group_size": 32},
        "calib": {"source": "pydoc", "nsamples": 2, "seqlen": 32}, "train": {"epochs": 1},
        "eval": {"datasets": [], "baselines": []}, "output_dir": str(tmp_path / "out"),
        "trainer": {"callbacks": [{"class_path": "callbacks.llama_cpp.LlamaCppCheck"}]},
    }))
    from omniquant_pl import sequencer

    monkeypatch.setattr(sequencer, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["calibrate", "--config", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "LlamaCppCheck compares exact exports: this run (W3A16g32, asymmetric) is not on Q4_0's grid" in last
    assert "configs/smollm2-135m/quickstart.yaml" in last and "--requantize" not in last
