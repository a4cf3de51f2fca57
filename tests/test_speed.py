"""benchmarks/speed.py on a tiny block (CPU): both paths run the real calibration and agree."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from omniquant_pl import TrainConfig
from omniquant_pl.checkpoint import config_hash
from omniquant_pl.config import ModelConfig, RunConfig
from omniquant_pl.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed


def test_speed_benchmark_compiled_block_step_matches_reference(tmp_path):
    output = tmp_path / "speed.json"
    report = speed.main(["--shape", "tiny", "--nsamples", "4", "--seqlen", "32", "--epochs", "2", "--compare",
                         "--compile", "block", "--work-dir", str(tmp_path / "work"), "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    reference, compiled = report["rows"]
    assert reference["compile"] == "off" and not reference["compiled_step"]
    assert compiled["compiled_step"], "the block step did not compile (fell back to eager)"
    assert reference["steps_per_epoch"] == compiled["steps_per_epoch"] == 4
    assert compiled["final_epoch_loss"] == pytest.approx(reference["final_epoch_loss"], rel=1e-4)
    assert compiled["speedup_vs_reference"] > 0 and compiled["tflops"] > 0


def test_speed_settings_are_validated_and_do_not_change_the_checkpoint_identity():
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="fast")
    with pytest.raises(ConfigError, match="cache_device"):
        TrainConfig(cache_device="gpu0")
    assert TrainConfig(batch_size=4, lr_batch_scaling="sqrt").lr_multiplier == 2.0
    assert TrainConfig(batch_size=4, lr_batch_scaling="linear").lr_multiplier == 4.0
    assert TrainConfig(batch_size=4).lr_multiplier == 1.0
    base = RunConfig(model=ModelConfig("m"))
    faster = RunConfig(model=ModelConfig("m"), train=TrainConfig(compile="block", cache_device="cpu"))
    assert config_hash(base) == config_hash(faster)  # a resumed run may switch speed settings
    assert config_hash(base) != config_hash(RunConfig(model=ModelConfig("m"), train=TrainConfig(batch_size=2)))


def test_manual_step_of_the_cuda_graph_mode_trains_like_the_automatic_step(tmp_path, tokenizer):
    """train.cuda_graph switches to manual optimization; where recording is impossible (here: no
    GPU) it falls back to a plain manual step, which must train exactly like the default."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    from omniquant_pl import CalibConfig, EvalConfig, QuantConfig, calibrate

    def run(name, cuda_graph):
        config = RunConfig(
            model=ModelConfig("tiny"), quant=QuantConfig(wbits=3),
            calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
            train=TrainConfig(epochs=2, batch_size=2, cuda_graph=cuda_graph),
            eval=EvalConfig(datasets=[], baselines=[]), output_dir=str(tmp_path / name), save_model=False,
        )
        results = calibrate(config, model=tiny_llama(), tokenizer=tokenizer)
        return results, load_file(tmp_path / name / "learned_params.safetensors")

    auto_results, auto = run("auto", False)
    manual_results, manual = run("manual", True)
    assert all(block.get("cuda_graph_step") is False for block in manual_results["blocks"])
    for key in auto:
        torch.testing.assert_close(auto[key], manual[key], rtol=1e-6, atol=1e-7)
    assert [b["final_loss"] for b in auto_results["blocks"]] == pytest.approx(
        [b["final_loss"] for b in manual_results["blocks"]], rel=1e-6)
