"""`omniquant evaluate` (run dirs, saved models, FP/RTN baselines) and `omniquant compare`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import cli
from omniquant_pl.calib.data import load_text, tokenize_cached
from omniquant_pl.config import EvalConfig, QuantConfig
from omniquant_pl.errors import ConfigError
from omniquant_pl.eval.perplexity import evaluate_perplexity

EVAL_ARGS = ["--eval.datasets", "[pydoc]", "--eval.seqlen", "64", "--eval.max_windows", "3"]


def _ppl(model, tokenizer) -> float:
    ids = tokenize_cached(tokenizer, load_text("pydoc", "eval"))
    return evaluate_perplexity(model, ids, seqlen=64, max_windows=3)[0]


@pytest.fixture
def fp_dir(tmp_path, tokenizer) -> Path:
    path = tmp_path / "fp"
    tiny_llama(seed=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def run_dir(tmp_path, tokenizer) -> Path:
    """An omniquant output directory: results.json + model/ recording W4A16 in config.omniquant."""
    run = tmp_path / "run-w4a16"
    model = tiny_llama(seed=5)
    model.config.omniquant = {"method": "omniquant-lwc", "wbits": 4, "abits": 16, "group_size": 0,
                              "symmetric": False, "fake_quant": True}
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    results = {"quant_tag": "W4A16", "saved_model": str(run / "model"),
               "perplexity": {"fp": {"pydoc": {"ppl": 400.0, "windows": 3, "seqlen": 64}},
                              "rtn": {"pydoc": {"ppl": 900.0, "windows": 3, "seqlen": 64}},
                              "omniquant": {"pydoc": {"ppl": 500.0, "windows": 3, "seqlen": 64}}}}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_evaluate_an_output_dir_writes_eval_json_there(run_dir, tokenizer):
    assert cli.main(["evaluate", "--model.name_or_path", str(run_dir), *EVAL_ARGS]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["run_dir"] == str(run_dir) and list(report["methods"]) == ["omniquant"]
    assert {"torch", "transformers", "lightning"} <= report["versions"].keys()
    method = report["methods"]["omniquant"]
    assert method["bits"] == "W4A16"
    assert method["disk_bytes"] == (run_dir / "model" / "model.safetensors").stat().st_size
    assert method["packed_bytes"] < method["disk_bytes"] / 2  # 4-bit linears, fp16 rest vs fp32 on disk
    expected = _ppl(tiny_llama(seed=5), tokenizer)  # the saved weights, evaluated directly
    assert report["perplexity"]["omniquant"]["pydoc"]["ppl"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_fp_and_rtn_baselines_of_a_plain_model(fp_dir, tmp_path, tokenizer):
    from omniquant_pl.arch import get_arch
    from omniquant_pl.quant.rtn import rtn_weights

    out = tmp_path / "baselines.json"
    assert cli.main(["evaluate", "--model.name_or_path", str(fp_dir), *EVAL_ARGS, "--baselines", "[fp,rtn]",
                     "--quant.wbits", "3", "--quant.group_size", "16", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {m: v["bits"] for m, v in report["methods"].items()} == {"fp": "W16A16", "rtn": "W3A16g16"}
    model = tiny_llama(seed=4)
    assert report["perplexity"]["fp"]["pydoc"]["ppl"] == pytest.approx(_ppl(model, tokenizer), rel=1e-5)
    with rtn_weights(model, get_arch(model), QuantConfig(wbits=3, group_size=16)):
        rtn = _ppl(model, tokenizer)
    assert report["perplexity"]["rtn"]["pydoc"]["ppl"] == pytest.approx(rtn, rel=1e-5)
    assert report["methods"]["rtn"]["disk_bytes"] is None  # nothing saved for RTN
    assert report["methods"]["rtn"]["packed_bytes"] < report["methods"]["fp"]["packed_bytes"]


def test_compare_writes_markdown_and_chart(run_dir, fp_dir, tmp_path, capsys):
    baselines = tmp_path / "baselines" / "eval.json"
    assert cli.main(["evaluate", "--model.name_or_path", str(fp_dir), *EVAL_ARGS, "--baselines", "[fp,rtn]",
                     "--quant.wbits", "4", "--quant.abits", "4", "--output", str(baselines.parent)]) == 0
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert cli.main(["compare", str(baselines.parent), str(run_dir), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "W4A4" in printed and "comparison.md" in printed
    lines = (out / "comparison.md").read_text().splitlines()
    assert lines[0].startswith("| run | bits | method | pydoc ppl (3×64) |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[:3] for row in rows] == [["baselines", "W16A16", "fp"], ["baselines", "W4A4", "rtn"],
                                         ["run-w4a16", "W16A16", "fp"], ["run-w4a16", "W4A16", "rtn"],
                                         ["run-w4a16", "W4A16", "omniquant"]]
    assert rows[4][3] == "500.00"  # the run dir's results.json (no eval.json there yet)
    assert (out / "comparison.png").stat().st_size > 5000
    assert len(json.loads((out / "comparison.json").read_text())) == 5


def test_compare_keeps_calibrates_baselines_beside_eval_json_and_splits_window_shapes(run_dir, tmp_path):
    """A run evaluated later (eval.json: omniquant on 8 windows) keeps calibrate's FP/RTN rows
    (results.json, 3 windows); perplexities over other windows land in other columns."""
    from omniquant_pl.eval.compare import collect, columns

    (run_dir / "eval.json").write_text(json.dumps({
        "quant_tag": "W4A16",
        "perplexity": {"omniquant": {"pydoc": {"ppl": 480.0, "windows": 8, "seqlen": 64}}}}))
    rows = collect([str(run_dir)])
    assert [r.method for r in rows] == ["fp", "rtn", "omniquant"]  # one row per method, baselines first
    header, body = columns(rows)
    assert header[3:5] == ["pydoc ppl (3×64)", "pydoc ppl (8×64)"]
    assert [cells[3:5] for cells in body] == [["400.00", "-"], ["900.00", "-"], ["-", "480.00"]]  # re-evaluated


def test_compare_merges_eval_json_into_the_runs_rows_keeping_calibrates_other_datasets(run_dir):
    """eval.json evaluated omniquant on wikitext2 only: the run's omniquant row keeps calibrate's pydoc
    perplexity beside it, and its FP/RTN rows stay."""
    from omniquant_pl.eval.compare import collect

    (run_dir / "eval.json").write_text(json.dumps({
        "perplexity": {"omniquant": {"wikitext2": {"ppl": 30.0, "windows": 8, "seqlen": 64}}},
        "methods": {"omniquant": {"bits": "W4A16", "disk_bytes": 123}}}))
    rows = collect([str(run_dir)])
    omniquant = rows[-1]
    assert [r.method for r in rows] == ["fp", "rtn", "omniquant"]
    assert omniquant.perplexity["wikitext2"]["ppl"] == 30.0 and omniquant.perplexity["pydoc"]["ppl"] == 500.0
    assert omniquant.disk_bytes == 123


def test_evaluate_and_compare_errors_are_one_line(run_dir, tmp_path, capsys):
    def error(argv: list[str]) -> str:
        capsys.readouterr()
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ")
        return lines[-1]

    assert "does not exist" in error(["compare", str(tmp_path / "missing"), "--output", str(tmp_path / "c")])
    (tmp_path / "empty").mkdir()
    assert "neither eval.json nor results.json" in error(["compare", str(tmp_path / "empty")])
    assert "already quantized (W4A16)" in error(["evaluate", "--model.name_or_path", str(run_dir), *EVAL_ARGS,
                                                 "--baselines", "[rtn]"])
    (run_dir / "model" / "config.json").unlink()
    assert "without a saved model" in error(["evaluate", "--model.name_or_path", str(run_dir), *EVAL_ARGS])


def test_eval_config_validates_task_settings(tmp_path):
    assert EvalConfig(tasks=["piqa"], num_fewshot=5, task_include_path=str(tmp_path)).num_fewshot == 5
    with pytest.raises(ConfigError, match="task_include_path"):
        EvalConfig(task_include_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="num_fewshot"):
        EvalConfig(num_fewshot=-1)
    with pytest.raises(ConfigError, match="task names"):
        EvalConfig(tasks=["piqa,arc_easy"])


def test_packed_size_estimate():
    from omniquant_pl.eval.size import packed_bytes

    model = tiny_llama()
    fp = packed_bytes(model)
    assert fp == sum(p.numel() for p in model.parameters()) * 2
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    outputs = sum(m.weight.shape[0] for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # 4-bit weights + fp16 scale and zero point per output channel
    assert packed_bytes(model, QuantConfig(wbits=4)) == fp - linear * 2 + linear // 2 + outputs * 4


def test_evaluate_records_a_dataset_that_cannot_load_as_a_visible_skip(run_dir, monkeypatch, capsys):
    """One failure policy for `omniquant evaluate` and the calibration's evaluation: a source that
    cannot load (here: offline) is skipped, recorded in eval.json and printed; the others are measured."""
    from omniquant_pl.eval import perplexity

    real = perplexity.perplexity_on_source

    def offline(model, tokenizer, source, *args, **kwargs):
        if source == "wikitext2":
            raise ConfigError("wikitext2: no local copy and the hub is unreachable (offline)")
        return real(model, tokenizer, source, *args, **kwargs)

    monkeypatch.setattr(perplexity, "perplexity_on_source", offline)
    monkeypatch.setattr("omniquant_pl.preflight.check_evaluation", lambda *a, **k: None)
    assert cli.main(["evaluate", "--model.name_or_path", str(run_dir), "--eval.datasets", "[wikitext2,pydoc]",
                     "--eval.seqlen", "64", "--eval.max_windows", "3"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert "offline" in report["skipped_eval"]["wikitext2"]
    assert list(report["perplexity"]["omniquant"]) == ["pydoc"]
    assert "skipped wikitext2: wikitext2: no local copy" in capsys.readouterr().out
