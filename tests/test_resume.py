"""Resume after SIGKILL mid-block == uninterrupted run; mismatched resume refused; YAML callbacks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

import cli
from omniquant_pl.quant.codes import codes_path

ROOT = Path(__file__).resolve().parents[1]


def _config(path: Path, model_dir: Path, output_dir: Path, callbacks: list | None = None) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"wbits": 3, "group_size": 16},
        "calib": {"source": "pydoc", "nsamples": 4, "seqlen": 64},
        "train": {"epochs": 3, "batch_size": 2, "shuffle": True},
        "eval": {"datasets": ["pydoc"], "seqlen": 64, "max_windows": 2},
        "output_dir": str(output_dir),
    }
    if callbacks:
        config["trainer"] = {"callbacks": callbacks}
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_mid_block_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    marker = tmp_path / "paused"
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    pause = {"class_path": "helpers_callbacks.PauseInBlock", "init_args": {"block": 1, "marker": str(marker)}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "calibrate", "--config",
         str(_config(tmp_path / "pause.yaml", tiny_model_dir, killed_dir, [pause]))],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the run never reached block 1"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of block 1's training
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((killed_dir / "checkpoint.json").read_text())
    assert state["finished_blocks"] == 1
    assert not (killed_dir / "model").exists()
    assert not list(killed_dir.glob(".*.tmp"))  # no half-written files

    plain = _config(tmp_path / "plain.yaml", tiny_model_dir, killed_dir)
    assert cli.main(["calibrate", "--config", str(plain), "--resume", "true"]) == 0
    assert cli.main(["calibrate", "--config", str(plain), "--output_dir", str(clean_dir)]) == 0

    resumed, clean = load_file(killed_dir / "learned_params.safetensors"), load_file(clean_dir / "learned_params.safetensors")
    assert resumed.keys() == clean.keys() and any(k.startswith("layers.1.") for k in clean)
    for key in clean:
        torch.testing.assert_close(resumed[key], clean[key], rtol=0, atol=0)
    for index in (0, 1):  # the stored integer codes too
        resumed_codes, clean_codes = (load_file(codes_path(d, index)) for d in (killed_dir, clean_dir))
        assert resumed_codes.keys() == clean_codes.keys()
        assert all(torch.equal(resumed_codes[k], clean_codes[k]) for k in clean_codes)
    resumed_results = json.loads((killed_dir / "results.json").read_text())
    clean_results = json.loads((clean_dir / "results.json").read_text())
    assert resumed_results["resumed_at_block"] == 1
    assert [b["final_loss"] for b in resumed_results["blocks"]] == [b["final_loss"] for b in clean_results["blocks"]]
    assert (resumed_results["perplexity"]["omniquant"]["pydoc"]["ppl"]
            == clean_results["perplexity"]["omniquant"]["pydoc"]["ppl"])


def test_mismatched_resume_and_accidental_overwrite_are_refused(tmp_path, tiny_model_dir, capsys):
    config = _config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true",
                     "--quant.wbits", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different config" in err and "quant.wbits: 3 -> 4" in err
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 2
    assert "--resume true" in capsys.readouterr().err
    # resuming a finished run recomputes nothing but the final evaluation
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 0


def test_callback_named_in_yaml_runs_for_every_block(tmp_path, tiny_model_dir):
    record = tmp_path / "blocks.txt"
    callback = {"class_path": "helpers_callbacks.RecordBlocks", "init_args": {"path": str(record)}}
    config = _config(tmp_path / "cb.yaml", tiny_model_dir, tmp_path / "out", [callback])
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    finally:
        sys.path.remove(str(ROOT / "tests"))
    lines = record.read_text().splitlines()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [line.split()[0] for line in lines] == ["0", "1"]
    assert [float(line.split()[1]) for line in lines] == [float(f"{b['final_loss']:.6g}") for b in results["blocks"]]


def test_readme_custom_callback_example_runs(tmp_path, tiny_model_dir):
    readme = (ROOT / "README.md").read_text()
    after = readme.split("<!-- example: plateau-callback -->", 1)[1]
    code = after.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    log_path = tmp_path / "plateau.txt"
    callback = namespace["StopOnPlateau"](min_delta=0.5, log_path=str(log_path))  # stops after epoch 2
    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    cfg = RunConfig(model=ModelConfig(str(tiny_model_dir)), quant=QuantConfig(wbits=3),
                    calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=6),
                    eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                    output_dir=str(tmp_path / "out"), save_model=False)
    results = calibrate(cfg, callbacks=[callback])
    rows = [line.split() for line in log_path.read_text().splitlines()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(int(r[1]) == 2 for r in rows)  # the plateau rule ended every block after 2 of 6 epochs
    assert all(len(b.epoch_losses) == 2 for b in results.blocks)
    assert (tmp_path / "out" / "block_losses.png").is_file()


def test_options_added_later_leave_older_checkpoints_resumable():
    """quant.grid came after checkpoints existed: at its default it is not part of the config identity
    (an older run's hash still matches); set, it is."""
    from omniquant_pl import ModelConfig, QuantConfig, RunConfig, TrainConfig
    from omniquant_pl.checkpoint import config_hash, config_identity

    default = RunConfig(model=ModelConfig("m"), quant=QuantConfig(wbits=4, group_size=32))
    gguf = RunConfig(model=ModelConfig("m"), quant=QuantConfig(wbits=4, group_size=32, grid="gguf"))
    assert "grid" not in config_identity(default)["quant"]
    assert config_identity(gguf)["quant"]["grid"] == "gguf"
    assert config_hash(default) != config_hash(gguf)
    # quant.let_up_down (default on) only matters with LET: a weight-only run's identity is unchanged, and
    # an older LET run (no such scale) resumes with --quant.let_up_down false
    assert "let_up_down" not in config_identity(default)["quant"]
    let_now = RunConfig(model=ModelConfig("m"), quant=QuantConfig(wbits=4, abits=4, let=True))
    let_before = RunConfig(model=ModelConfig("m"), quant=QuantConfig(wbits=4, abits=4, let=True, let_up_down=False))
    assert config_identity(let_now)["quant"]["let_up_down"] is True
    assert "let_up_down" not in config_identity(let_before)["quant"]
    # train.shuffle_seed: absent at its default (calib.seed), and meaningless without shuffle
    assert "shuffle_seed" not in config_identity(default)["train"]
    unshuffled = RunConfig(model=ModelConfig("m"), train=TrainConfig(shuffle_seed=5))
    assert config_hash(unshuffled) == config_hash(RunConfig(model=ModelConfig("m")))
    shuffled = RunConfig(model=ModelConfig("m"), train=TrainConfig(shuffle=True, shuffle_seed=5))
    assert config_hash(shuffled) != config_hash(RunConfig(model=ModelConfig("m"), train=TrainConfig(shuffle=True)))


def _finished_run(tmp_path, tiny_model_dir, name="out"):
    config = _config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name)
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    return config, tmp_path / name


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_block_is_checkpointed_in_its_own_file_and_the_run_ends_with_all_of_them(tmp_path, tiny_model_dir):
    _, out = _finished_run(tmp_path, tiny_model_dir)
    merged = load_file(out / "learned_params.safetensors")
    per_block = {}
    for index in (0, 1):
        per_block.update({f"layers.{index}.{k}": v for k, v in load_file(out / "learned" / f"block_{index:03d}.safetensors").items()})
    assert per_block.keys() == merged.keys() and all(torch.equal(per_block[k], merged[k]) for k in merged)
    assert oct((out / "checkpoint.json").stat().st_mode & 0o777) == oct((tmp_path / "out.yaml").stat().st_mode & 0o777)


def test_damaged_checkpoint_json_is_refused_and_left_untouched(tmp_path, tiny_model_dir, capsys):
    config, out = _finished_run(tmp_path, tiny_model_dir)
    (out / "checkpoint.json").write_text('{"finished_blocks": 2, "config_ha')  # torn by hand or a bad disk
    before = _snapshot(out)
    capsys.readouterr()
    for extra in ([], ["--resume", "true"]):  # a plain re-run must not read it as "no progress" and overwrite
        assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "checkpoint.json is damaged" in err[0] and "start over" in err[0], err  # before loading
        assert _snapshot(out) == before


def test_missing_or_damaged_learned_block_file_is_refused_on_resume(tmp_path, tiny_model_dir, capsys):
    config, out = _finished_run(tmp_path, tiny_model_dir)
    block = out / "learned" / "block_001.safetensors"
    block.write_bytes(block.read_bytes()[:40])  # truncated
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "block_001.safetensors is damaged" in err[0]
    block.unlink()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 2
    assert "block_001.safetensors is missing" in capsys.readouterr().err


def test_checkpoint_from_before_per_block_files_still_resumes(tmp_path, tiny_model_dir):
    """Older runs kept every block in learned_params.safetensors: cut one back to 1 finished block and resume."""
    config, clean = _finished_run(tmp_path, tiny_model_dir, "clean")
    old = tmp_path / "old"
    old.mkdir()
    state = json.loads((clean / "checkpoint.json").read_text())
    state["finished_blocks"], state["results"]["blocks"] = 1, state["results"]["blocks"][:1]
    (old / "checkpoint.json").write_text(json.dumps(state))
    block0 = load_file(clean / "learned" / "block_000.safetensors")
    from safetensors.torch import save_file

    save_file({f"layers.0.{k}": v for k, v in block0.items()}, old / "learned_params.safetensors")
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true",
                     "--output_dir", str(old)]) == 0
    resumed, expected = load_file(old / "learned_params.safetensors"), load_file(clean / "learned_params.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_resume_refuses_other_calibration_ids(tmp_path, tiny_model_dir, capsys):
    """The calibration text at the configured (relative or absolute) path changed since the checkpoint."""
    text = tmp_path / "calib.txt"
    from pydoc_data import topics

    text.write_text("\n\n".join(list(topics.topics.values())[:40]), encoding="utf-8")
    config = _config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    args = ["calibrate", "--config", str(config), "--train.epochs", "1", "--calib.source", str(text)]
    assert cli.main(args) == 0
    assert cli.main(args + ["--resume", "true"]) == 0  # same text: resumes (nothing left but evaluation)
    text.write_text("\n\n".join(list(topics.topics.values())[40:80]), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(args + ["--resume", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "calibration token ids differ from the checkpoint's" in err


def test_ctrl_c_message_says_how_to_resume(tmp_path):
    from types import SimpleNamespace

    out = tmp_path / "run"
    sub = SimpleNamespace(output_dir=str(out))
    assert "nothing to resume" in cli.interrupted_message("calibrate", sub)
    out.mkdir()
    (out / "checkpoint.json").write_text(json.dumps(
        {"finished_blocks": 3, "config_hash": "x", "results": {"blocks": [{}, {}, {}]}}))
    message = cli.interrupted_message("calibrate", sub)
    assert "3 finished blocks are saved" in message
    assert f"omniquant calibrate --config {out / 'config.yaml'} --resume true" in message
    assert cli.interrupted_message("evaluate", None) == "interrupted"


def _only_error_line(capsys) -> str:
    """The one `error:` line a failed command printed last (no traceback before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return err.strip().splitlines()[-1]


def test_disk_full_at_model_save_keeps_the_results_and_leaves_no_half_model(tmp_path, tiny_model_dir, capsys,
                                                                           monkeypatch):
    import errno

    from transformers import PreTrainedModel

    def full_disk(self, path, *args, **kwargs):
        (Path(path) / "config.json").write_text("{}")  # something was written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))

    config = _config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 2
    last = _only_error_line(capsys)
    assert last.startswith("error: the disk is full") and "--resume true" in last, last
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "omniquant" in results["perplexity"] and len(results["blocks"]) == 2
    assert not (tmp_path / "out" / "model").exists() and not list((tmp_path / "out").glob(".model.*"))
    monkeypatch.undo()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 0
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_disk_full_mid_run_is_one_line_and_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import errno

    from omniquant_pl import checkpoint

    real_save = checkpoint.atomic_save_safetensors
    calls = []

    def fill_up_at_block_1(tensors, path, metadata=None):
        calls.append(path)
        if "block_001" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, metadata)

    config = _config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", fill_up_at_block_1)
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 2
    last = _only_error_line(capsys)
    assert last.startswith("error: the disk is full") and "No space left on device" in last and "--resume true" in last
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["finished_blocks"] == 1
    monkeypatch.undo()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 0


def test_zero_shot_tasks_that_cannot_load_are_a_warning_not_a_lost_run(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """eval.tasks without network: the calibration and the model are kept, the tasks are skipped and recorded."""
    import logging

    from omniquant_pl.eval import zeroshot

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(zeroshot, "run_tasks", no_network)
    config = _config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--eval.tasks", "[piqa]"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "ConnectionError" in results["skipped_eval"]["tasks"] and "omniquant" in results["perplexity"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert "skipping zero-shot tasks" in caplog.text


def test_results_record_the_software_stack_and_a_resume_on_another_one_warns(tmp_path, tokenizer, caplog):
    """results.json, checkpoint.json and the export name the torch/transformers/lightning that made
    them; resuming under other versions warns, names them, and records where the stack changed."""
    from importlib import metadata

    import pytest
    from conftest import tiny_llama
    from family_checks import StopAtBlock, tiny_run_config

    from omniquant_pl import QuantConfig, calibrate
    from omniquant_pl.versions import software_versions

    quant = QuantConfig(wbits=4, group_size=16)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_run_config(tmp_path, "run", quant), callbacks=[StopAtBlock(1)], model=tiny_llama(),
                  tokenizer=tokenizer)
    checkpoint_path = tmp_path / "run" / "checkpoint.json"
    state = json.loads(checkpoint_path.read_text())
    recorded = state["results"]["versions"]
    assert recorded == software_versions()
    assert {name: recorded[name] for name in ("torch", "transformers", "lightning")} == {
        name: metadata.version(name) for name in ("torch", "transformers", "lightning")}
    state["results"]["versions"]["transformers"] = "5.0.0"  # as if block 0 ran on another stack
    checkpoint_path.write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        results = calibrate(tiny_run_config(tmp_path, "run", quant, resume=True), model=tiny_llama(),
                            tokenizer=tokenizer)
    warned = [r.getMessage() for r in caplog.records if "other software" in r.getMessage()]
    assert len(warned) == 1 and f"transformers 5.0.0 -> {metadata.version('transformers')}" in warned[0]
    assert results.versions["transformers"] == "5.0.0"  # the stack that started the run stays named
    assert results.resumed_with_versions == [{"at_block": 1, "versions": software_versions()}]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["resumed_with_versions"][0]["versions"]["transformers"] == metadata.version("transformers")


def _cut_back_to_one_block(run: Path) -> None:
    """Make a finished run look killed after its first block."""
    state = json.loads((run / "checkpoint.json").read_text())
    state["finished_blocks"], state["results"]["blocks"] = 1, state["results"]["blocks"][:1]
    (run / "checkpoint.json").write_text(json.dumps(state))
    (run / "learned" / "block_001.safetensors").unlink()


def test_resume_acts_on_the_copied_folder_named_not_the_one_its_config_points_at(tmp_path, tiny_model_dir):
    import shutil

    _, original = _finished_run(tmp_path, tiny_model_dir, "original")
    _cut_back_to_one_block(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = _snapshot(original)
    assert cli.main(["calibrate", "--config", str(copy / "config.yaml"), "--resume", "true"]) == 0
    assert _snapshot(original) == before  # the folder the config.yaml names as output_dir is untouched
    assert json.loads((copy / "checkpoint.json").read_text())["finished_blocks"] == 2
    assert json.loads((copy / "results.json").read_text())["resumed_at_block"] == 1


def test_resume_of_a_relative_output_dir_from_another_working_directory_continues_that_folder(
        tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    config = _config(tmp_path / "run.yaml", tiny_model_dir, Path("out"))
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    run = tmp_path / "project" / "out"
    _cut_back_to_one_block(run)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["calibrate", "--config", str(run / "config.yaml"), "--resume", "true"]) == 0
    assert not (tmp_path / "elsewhere" / "out").exists()  # no fresh run from block 0 in a new folder
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_at_block"] == 1 and len(results["blocks"]) == 2


def test_resume_refuses_another_model_at_the_same_path(tmp_path, tiny_model_dir, capsys):
    import shutil

    from conftest import TINY_BUILDERS

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config, run = _config(tmp_path / "run.yaml", model_dir, tmp_path / "out"), tmp_path / "out"
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1"]) == 0
    assert json.loads((run / "results.json").read_text())["model_fingerprint"]
    _cut_back_to_one_block(run)
    family = next(name for name in TINY_BUILDERS if name in tiny_model_dir.name)
    TINY_BUILDERS[family](seed=123).save_pretrained(model_dir)  # the same architecture, other weights, same path
    before = _snapshot(run)
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one its 1 finished blocks were calibrated on" in err[0], err
    assert _snapshot(run) == before


def test_saved_model_follows_the_umask_and_stale_model_staging_is_cleaned(tmp_path, tiny_model_dir):
    config, run = _finished_run(tmp_path, tiny_model_dir)
    umask = os.umask(0)
    os.umask(umask)
    model = run / "model"
    assert model.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in model.iterdir()} == {0o666 & ~umask}
    _cut_back_to_one_block(run)
    for stale in (".model.streamed", ".model.k1ll3d"):  # a streamed session's shards; a save killed midway
        (run / stale).mkdir()
        (run / stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    assert cli.main(["calibrate", "--config", str(config), "--train.epochs", "1", "--resume", "true"]) == 0
    assert not list(run.glob(".model.*"))
