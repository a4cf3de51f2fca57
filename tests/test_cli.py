"""The `omniquant` command: end to end on tiny models, config parsing, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cli

ROOT = Path(__file__).resolve().parents[1]


def _write_config(path: Path, model_dir: Path, output_dir: Path, **quant) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"wbits": 3, **quant},
        "calib": {"source": "pydoc", "nsamples": 4, "seqlen": 64},
        "train": {"epochs": 2, "batch_size": 2},
        "eval": {"datasets": ["pydoc"], "seqlen": 64, "max_windows": 3},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_calibrate_end_to_end(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out", group_size=16)
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["train"]["epochs"] == 1  # the command-line override won
    assert results["quant_tag"] == "W3A16g16"
    assert {"fp", "rtn", "omniquant"} <= set(results["perplexity"])
    for block in results["blocks"]:
        assert {"rtn_loss", "init_loss", "final_loss", "seconds", "epoch_losses"} <= set(block)
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "logs" / "block_000" / "metrics.csv").is_file()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=384)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bad_inputs_fail_with_one_line(tmp_path, tiny_model_dir, gpt2_dir):
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--quant.wbits", "9"),
                           "quant.wbits", "2..8")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--quant.group_size", "48"),
                           "group_size 48 does not divide")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--model.name_or_path", str(gpt2_dir)),
                           "unsupported architecture 'gpt2'", "llama", "opt")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--model.name_or_path", "./no/such/dir"),
                           "does not exist")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--quant.wbitz", "3"),
                           "unrecognized arguments")
    _assert_one_line_error(_run_cli("calibrate", "--config", str(config), "--calib.source", "nope"),
                           "unknown text source 'nope'")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_configs_parse(path):
    parser = cli.build_parser()
    cfg = parser.parse_args(["calibrate", "--config", str(path)])
    init = parser.instantiate_classes(cfg).calibrate
    assert init.quant.wbits in (2, 3, 4, 6, 8)
    opt = path.parent.name.startswith("opt-")
    paper = not path.stem.startswith(("reduced-", "quickstart"))  # reduced-scale recipes pick their own epochs
    if init.quant.wbits == 2 and paper:  # the official OPT scripts run W2 without the aug loss
        assert init.train.epochs == 40 and init.train.aug_loss != opt
    if init.quant.abits < 16 or opt:  # weight-activation configs, and OPT weight-only as the official, learn LET
        assert init.quant.let
    if (init.quant.wbits, init.quant.abits) == (4, 4):
        assert init.quant.let_alpha == 0.75 and init.train.let_lr == 1e-3
    if path.stem.startswith(("gguf-", "reduced-gguf-")):  # calibrates exactly the grids of the GGUF type it is named after
        from omniquant_pl.export.gguf import plan

        assert plan(init.quant, path.stem.partition("gguf-")[2].upper(), requantize=False) == "exact"


def test_help_and_print_config():
    proc = _run_cli("calibrate", "--help")
    assert proc.returncode == 0 and "--quant.group_size" in proc.stdout and "--train.lwc_lr" in proc.stdout
    assert "known subclasses" not in proc.stdout and "BatchSizeFinder" not in proc.stdout  # no list of ~30 callbacks
    proc = _run_cli("calibrate", "--config", str(ROOT / "configs/smollm2-135m/w3a16.yaml"), "--print_config")
    assert proc.returncode == 0
    printed = yaml.safe_load(proc.stdout)
    assert printed["quant"]["wbits"] == 3 and printed["calib"]["nsamples"] == 128


def test_top_level_help_answers_without_importing_torch():
    """`omniquant` / `omniquant --help` print the commands at once: no torch, Lightning or transformers."""
    import subprocess
    import sys

    code = ("import sys, cli; cli.main(['--help']); cli.main([]); "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("[]") and proc.stdout.count("usage: omniquant") == 2
    commands = set(cli.build_parser()._subcommands_action.choices)
    assert commands == {"calibrate", "evaluate", "compare", "export"}
    assert all(f"  {name} " in cli.OVERVIEW for name in commands)


def test_evaluate_reinstalls_activation_quantization_of_a_saved_w4a4_model(tmp_path, tiny_model_dir, capsys):
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    assert cli.main(["calibrate", "--config", str(config), "--quant.wbits", "4", "--quant.abits", "4",
                     "--quant.let", "true", "--train.epochs", "1"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["omniquant"]["activations"]["bits"] == 4 and saved["omniquant"]["method"] == "omniquant-lwc+let"
    capsys.readouterr()
    assert cli.main(["evaluate", "--model.name_or_path", str(tmp_path / "out" / "model"), "--eval.datasets", "[pydoc]",
                     "--eval.seqlen", "64", "--eval.max_windows", "3", "--output", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["activations"]["bits"] == 4
    # the saved model + its activation quantizers reproduce the calibrated model's perplexity
    assert evaluated["methods"]["omniquant"]["bits"] == "W4A4"
    assert abs(evaluated["perplexity"]["omniquant"]["pydoc"]["ppl"] - results["perplexity"]["omniquant"]["pydoc"]["ppl"]) < 1e-3
