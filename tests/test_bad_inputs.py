"""Bad inputs: each ends in a one-line error that says what was received, what is allowed
and what to do (or a warning), before the model loads, with nothing written to the output directory.

The model folders here hold a real config.json and tokenizer but a dummy weights file, and loading
a model fails the test: every check below must run on the config alone.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

import cli
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.models import load_model_and_tokenizer as real_load_model_and_tokenizer

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, tokenizer) -> Path:
    """SmolLM2-135M's shapes (hidden 576, MLP 1536, context 8192) without its weights."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("smol_shapes")
    LlamaConfig(vocab_size=384, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not loaded by these tests")
    return path


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    import omniquant_pl.sequencer  # noqa: F401 - imported first, so it does not keep the stub after the test

    monkeypatch.setattr("omniquant_pl.models.load_model_and_tokenizer", refuse)
    monkeypatch.setattr("omniquant_pl.sequencer.load_model_and_tokenizer", refuse)


def _config(tmp_path: Path, model_dir: Path) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"wbits": 3},
        "calib": {"source": "pydoc", "nsamples": 4, "seqlen": 64},
        "train": {"epochs": 1},
        "eval": {"datasets": ["pydoc"], "seqlen": 64, "max_windows": 2},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _main(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of the `omniquant` command run in-process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, fragments: list[str]) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err
    for fragment in fragments:
        assert fragment in last, last


def _files(tmp_path: Path) -> dict[str, str]:
    """Bad input files, by name."""
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    no_text = tmp_path / "calib.jsonl"
    no_text.write_text('{"content": "a document"}\n{"content": "another"}\n')
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "fine"}\nnot json at all\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    linked = tmp_path / "linked_run"  # a run folder with a link the run did not make
    linked.mkdir()
    (linked / "block_losses.png").symlink_to(tmp_path / "outside.png")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  name_or_path: x\n quant: [1,\n")
    return {"binary": str(binary), "no_text": str(no_text), "not_json": str(not_json), "a_file": str(a_file),
            "read_only": str(read_only / "out"), "bad_yaml": str(bad_yaml),
            "linked": str(linked)}


# (arguments after `calibrate --config run.yaml`, fragments of the one-line error); {name} = a _files path
CALIBRATE_ROWS = {
    "wbits-16": (["--quant.wbits", "16"], ["quant.wbits", "2..8", "got 16", "quant.abits", "--baselines [fp]"]),
    "group-size-not-dividing": (["--quant.group_size", "100"],
                                ["group_size 100 does not divide", "576", "1536", "use 64"]),
    "seqlen-over-context": (["--calib.seqlen", "9000"], ["calib.seqlen 9000", "context of 8192", "<= 8192"]),
    "eval-seqlen-over-context": (["--eval.seqlen", "9000"], ["eval.seqlen 9000", "context of 8192"]),
    "binary-calib-text": (["--calib.source", "{binary}"], ["calib.source", "calib.txt", "not UTF-8 text", ".jsonl"]),
    "jsonl-without-text": (["--calib.source", "{no_text}"],
                           ["calib.source", "calib.jsonl", "line 1", "no string 'text' field", "content"]),
    "jsonl-not-json": (["--calib.source", "{not_json}"], ["broken.jsonl", "line 2 is not JSON"]),
    "output-dir-is-a-file": (["--output_dir", "{a_file}"], ["output_dir", "a_file", "is a file"]),
    "output-dir-under-a-file": (["--output_dir", "{a_file}/run"], ["output_dir", "a_file", "is a file"]),
    "output-dir-holds-a-link": (["--output_dir", "{linked}"],
                                ["output_dir", "symbolic link", "block_losses.png", "outside.png", "remove the link"]),
    "output-dir-in-proc": (["--output_dir", "/proc/omniquant-test/run"], ["output_dir", "/proc", "not writable"]),
    "eval-dataset-typo": (["--eval.datasets", "[wikitxt2]"],
                          ["eval.datasets", "unknown text source 'wikitxt2'", "wikitext2", "pydoc"]),
    "calib-source-typo": (["--calib.source", "nope"], ["calib.source", "unknown text source 'nope'"]),
    "abbreviated-flag": (["--quant.w", "5"], ["unrecognized arguments", "--quant.w"]),
    "precision": (["--train.precision", "17"], ["train.precision", "'17'", "32-true", "bf16-mixed"]),
    "accelerator-name": (["--train.accelerator", "tpu"], ["train.accelerator", "'tpu'", "auto", "cpu"]),
    "invalid-yaml": (["--config", "{bad_yaml}"], ["bad.yaml", "not valid YAML", "line 3"]),
}
CALIBRATE_PARAMS = [pytest.param(*row, id=name) for name, row in CALIBRATE_ROWS.items()] + [
    pytest.param(["--output_dir", "{read_only}"], ["output_dir", "not writable"], id="output-dir-read-only",
                 marks=pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")),
    pytest.param(["--train.accelerator", "gpu"], ["train.accelerator gpu", "no CUDA GPU", "cpu"],
                 id="accelerator-gpu-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
]


@pytest.mark.parametrize("args, fragments", CALIBRATE_PARAMS)
def test_calibrate_refuses_before_loading(args, fragments, tmp_path, smol_dir, capsys):
    files = _files(tmp_path)
    config = _config(tmp_path, smol_dir)
    code, err = _main(capsys, "calibrate", "--config", config, *[a.format(**files) for a in args])
    _assert_one_line_error(code, err, [f.format(**files) for f in fragments])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder, fragments", [
    ("vit", ["'vit' model", "not a causal language model"]),
    ("empty", ["is empty", "config.json"]),
    ("no-weights", ["no weights", "*.safetensors", "found: config.json"]),
    ("no-config", ["no config.json", "found: notes.txt"]),
    ("no-tokenizer", ["no tokenizer files", "tokenizer.json"]),
])
def test_evaluate_refuses_a_folder_that_is_no_causal_lm(folder, fragments, tmp_path, smol_dir, capsys):
    from transformers import ViTConfig

    path = tmp_path / folder
    path.mkdir()
    if folder == "vit":
        ViTConfig().save_pretrained(path)
        (path / "model.safetensors").write_bytes(b"x")
    elif folder == "no-weights":
        (path / "config.json").write_text((smol_dir / "config.json").read_text())
        (path / "tokenizer.json").write_text((smol_dir / "tokenizer.json").read_text())
    elif folder == "no-config":
        (path / "notes.txt").write_text("x")
    elif folder == "no-tokenizer":
        (path / "config.json").write_text((smol_dir / "config.json").read_text())
        (path / "model.safetensors").write_bytes(b"x")
    code, err = _main(capsys, "evaluate", "--model.name_or_path", path, "--eval.datasets", "[pydoc]",
                      "--output", tmp_path / "eval")
    _assert_one_line_error(code, err, [str(path), *fragments])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--eval.datasets", "[wikitxt2]"], ["eval.datasets", "unknown text source 'wikitxt2'"]),
    (["--eval.seqlen", "9000"], ["eval.seqlen 9000", "context of 8192"]),
    (["--accelerator", "tpu"], ["--accelerator", "'tpu'", "cpu"]),
    (["--output", "{a_file}/eval.json"], ["--output", "a_file", "is a file"]),
], ids=["dataset-typo", "seqlen-over-context", "accelerator", "output-under-a-file"])
def test_evaluate_refuses_before_loading(args, fragments, tmp_path, smol_dir, capsys):
    files = _files(tmp_path)
    code, err = _main(capsys, "evaluate", "--model.name_or_path", smol_dir, *[a.format(**files) for a in args])
    _assert_one_line_error(code, err, [f.format(**files) for f in fragments])


@pytest.mark.parametrize("output", ["{a_file}", "{a_file}/comparison"], ids=["a-file", "under-a-file"])
def test_compare_refuses_an_output_that_is_a_file(output, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"perplexity": {"fp": {"pydoc": {"ppl": 10.0, "windows": 1}}}}))
    files = _files(tmp_path)
    code, err = _main(capsys, "compare", run, "--output", output.format(**files))
    _assert_one_line_error(code, err, ["--output", "a_file", "is a file"])


class StopAtLoad(OmniQuantError):
    pass


@pytest.mark.parametrize("args, warning", [
    (["--quant.wbits", "4", "--quant.abits", "4", "--quant.let", "false"], "W4A4 without LET"),
    (["--resume", "true"], "no checkpoint"),
], ids=["w4a4-without-let", "resume-without-checkpoint"])
def test_calibrate_warns_before_loading(args, warning, tmp_path, smol_dir, capsys, caplog, monkeypatch):
    def stop(*a, **k):
        raise StopAtLoad("stopped at the model load")

    monkeypatch.setattr("omniquant_pl.sequencer.load_model_and_tokenizer", stop)
    with caplog.at_level(logging.WARNING):
        code, err = _main(capsys, "calibrate", "--config", _config(tmp_path, smol_dir), *args)
    assert code == 2 and "stopped at the model load" in err
    assert any(warning in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), caplog.text


def test_w4a4_with_let_does_not_warn(tmp_path, smol_dir, capsys, caplog, monkeypatch):
    monkeypatch.setattr("omniquant_pl.sequencer.load_model_and_tokenizer", lambda *a, **k: (_ for _ in ()).throw(
        StopAtLoad("stopped at the model load")))
    with caplog.at_level(logging.WARNING):
        _main(capsys, "calibrate", "--config", _config(tmp_path, smol_dir), "--quant.wbits", "4",
              "--quant.abits", "4", "--quant.let", "true")
    assert not [r for r in caplog.records if "LET" in r.getMessage()]


def test_python_api_checks_before_loading(tmp_path, smol_dir):
    from omniquant_pl import CalibConfig, ModelConfig, QuantConfig, RunConfig, calibrate

    config = RunConfig(model=ModelConfig(str(smol_dir)), quant=QuantConfig(wbits=4, group_size=128),
                       calib=CalibConfig(source="pydoc", nsamples=2, seqlen=64), output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="group_size 128 does not divide .* use 64"):
        calibrate(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("requested, dims, expected", [
    (100, [576, 1536], 64),
    (128, [576, 1536], 64),
    (128, [4096, 11008], 128),
    (48, [64, 128], 32),
    (4096, [64, 128], 64),
    (64, [100, 300], 0),  # no power of two of at least 8 divides both: per channel
])
def test_suggested_group_size_divides_every_input_dim(requested, dims, expected):
    from omniquant_pl.quant.lwc import suggest_group_size

    assert suggest_group_size(requested, dims) == expected


def test_group_size_error_after_load_suggests_a_divisor():
    from omniquant_pl.quant.lwc import WeightQuantizer

    with pytest.raises(ConfigError, match="does not divide in_features 576.*use 64") as err:
        WeightQuantizer((8, 576), bits=4, group_size=100)
    assert "128" not in str(err.value)


def test_float16_model_on_cpu_calibrates(tmp_path, tiny_model_dir, monkeypatch):
    """--model.dtype float16 on a CPU: correct behaviour (each block calibrates in fp32 under
    32-true; the model stays float16), no error."""
    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr("omniquant_pl.sequencer.load_model_and_tokenizer", real_load_model_and_tokenizer)
    results = calibrate(RunConfig(
        model=ModelConfig(str(tiny_model_dir), dtype="float16"), quant=QuantConfig(wbits=4),
        calib=CalibConfig(source="pydoc", nsamples=2, seqlen=32), train=TrainConfig(epochs=1),
        eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]), output_dir=str(tmp_path / "out"),
        save_model=False,
    ))
    assert results.plan.precision == "32-true"
    assert all(torch.isfinite(torch.tensor(b.final_loss)) for b in results.blocks)


def test_hub_id_without_network_is_refused_at_once_or_read_from_the_cache(monkeypatch, tmp_path, capsys):
    """No ~1 minute of retries: an unreachable hub with the model not cached is one line at once; a
    cached model is used offline."""
    import huggingface_hub

    from omniquant_pl import models
    from omniquant_pl.config import ModelConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename, **kw: None)
    with pytest.raises(ConfigError, match="neither a local folder nor in the Hugging Face cache"):
        models.check_model_location(ModelConfig("meta-llama/Llama-2-7b-hf"))
    config = _config(tmp_path, tmp_path / "unused")
    code, err = _main(capsys, "calibrate", "--config", config, "--model.name_or_path", "meta-llama/Llama-2-7b-hf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "huggingface-cli download" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename, **kw: "/cache/config.json")
    assert models.check_model_location(ModelConfig("meta-llama/Llama-2-7b-hf")) == "meta-llama/Llama-2-7b-hf"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unwritable_token_cache_warns_and_goes_on(monkeypatch, tmp_path, tokenizer, caplog):
    from omniquant_pl.calib.data import TextSource, tokenize_cached

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OMNIQUANT_CACHE", str(blocker))
    source = TextSource("some text to tokenize", "test")
    with caplog.at_level(logging.WARNING):
        ids = tokenize_cached(tokenizer, source)
    assert torch.equal(ids, tokenizer(source.text, return_tensors="pt").input_ids[0])
    assert "is not writable" in caplog.text and "OMNIQUANT_CACHE" in caplog.text


def test_evaluate_with_tasks_and_no_lm_eval_is_refused_before_any_work(tmp_path, smol_dir, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    code, err = _main(capsys, "evaluate", "--model.name_or_path", smol_dir, "--eval.datasets", "[pydoc]",
                      "--eval.tasks", "[piqa]")
    _assert_one_line_error(code, err, ["eval.tasks", "piqa", "lm-evaluation-harness", "pip install"])


def test_a_memory_limit_is_one_line_not_a_traceback(tmp_path):
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (800 * 2**20, 800 * 2**20))

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "cli.py"), "calibrate", "--config",
                           str(root / "configs" / "smollm2-135m" / "quickstart.yaml"), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of memory" in lines[0] and "Traceback" not in proc.stderr, lines


def test_custom_code_model_without_trust_remote_code_names_the_option(tmp_path, capsys):
    import json

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "architectures": ["MyCustomLM"],
        "auto_map": {"AutoConfig": "configuration_custom.MyConfig", "AutoModelForCausalLM": "modeling_custom.MyCustomLM"}}))
    code, err = _main(capsys, "evaluate", "--model.name_or_path", folder, "--eval.datasets", "[pydoc]")
    _assert_one_line_error(code, err, ["auto_map", "--model.trust_remote_code true"])
