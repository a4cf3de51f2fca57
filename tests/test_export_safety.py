"""Export destinations: links, files in the way and the staging folders of killed exports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cli


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_output_that_is_a_link_or_under_a_file_is_refused_before_any_work(tmp_path, calibrated_run, capsys, monkeypatch):
    run = calibrated_run(wbits=4, group_size=32)
    import omniquant_pl.export as export

    def no_work(*args, **kwargs):
        raise AssertionError("the exporter ran")

    monkeypatch.setattr(export, "get_exporter", lambda name: no_work)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    (tmp_path / "a_file").write_text("in the way")
    capsys.readouterr()
    assert cli.main(["export", str(run), "--output", str(tmp_path / "link")]) == 2
    assert "is a symbolic link" in _one_line_error(capsys)
    assert cli.main(["export", str(run), "--output", str(tmp_path / "a_file" / "out")]) == 2
    assert "a_file" in (line := _one_line_error(capsys)) and "is a file" in line
    assert list(empty.iterdir()) == []


def test_the_staging_folder_of_a_killed_export_is_removed_by_the_next_export(tmp_path, calibrated_run):
    run = calibrated_run(wbits=4, group_size=32)
    destination = tmp_path / "export"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".export.killed.tmp"  # what a SIGKILLed export leaves: its partial files and its pid
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (stale / ".exporting-pid").write_text(gone.stdout.strip())
    live = tmp_path / ".export.running.tmp"  # an export still running (this process): kept
    live.mkdir()
    (live / ".exporting-pid").write_text(str(os.getppid()))
    assert cli.main(["export", str(run), "--output", str(destination)]) == 0
    assert not stale.exists() and live.exists()
    assert (destination / "export.json").is_file() and not (destination / ".exporting-pid").exists()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [".export.running.tmp", "export"]


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    return copy


def test_codes_outside_their_bit_range_are_refused_even_with_the_model_edited_to_match(tmp_path, calibrated_run, capsys):
    from safetensors.torch import load_file, save_file

    from omniquant_pl.quant.codes import load_block_codes, save_block_codes

    run = _copy_run(calibrated_run(wbits=4, group_size=32, symmetric=True, grid="gguf"), tmp_path)
    codes = load_block_codes(run, 0)
    weight = codes["self_attn.q_proj"]
    weight.codes[0, 0] = 100  # not a 4-bit code
    save_block_codes(run, 0, codes)
    state = load_file(run / "model" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = weight.dequantize(state[key].dtype)  # the saved model edited to agree with the codes
    save_file(state, run / "model" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    for extra in (["--format", "gguf", "--gguf-type", "Q4_0"], ["--format", "compressed-tensors"]):
        assert cli.main(["export", str(run), *extra]) == 2
        line = _one_line_error(capsys)
        assert "not valid 4-bit codes" in line and "100" in line, line
    assert not (run / "export").exists()


def test_exact_is_checked_by_reading_the_written_file_back(tmp_path, calibrated_run, capsys, monkeypatch):
    import omniquant_pl.export.gguf as gguf_export
    from omniquant_pl.export.gguf_blocks import pack_blocks

    run = calibrated_run(wbits=4, group_size=32, symmetric=True, grid="gguf")

    def one_code_off(type_name, weight):
        packed = pack_blocks(type_name, weight).copy()
        packed[0, 2] ^= 0x01  # the first block's first nibble: one code moved by one step
        return packed

    monkeypatch.setattr(gguf_export, "pack_linear", one_code_off)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--format", "gguf", "--gguf-type", "Q4_0", "--output", str(tmp_path / "g")]) == 2
    assert "does not hold the run's integers" in _one_line_error(capsys)
    assert not (tmp_path / "g").exists()
    monkeypatch.undo()
    assert cli.main(["export", str(run), "--format", "gguf", "--gguf-type", "Q4_0", "--output", str(tmp_path / "g")]) == 0
    import json

    report = json.loads((tmp_path / "g" / "export.json").read_text())
    assert report["exact"] and report["verified_tensors"] == 2 * 7


def test_compressed_tensors_exact_is_checked_by_reading_the_files_back(tmp_path, calibrated_run, capsys, monkeypatch):
    import omniquant_pl.export.compressed_tensors as ct

    run = calibrated_run(wbits=4, group_size=32, symmetric=True)
    original = ct.compressed_linear_state

    def one_code_off(module, weight, compression_format, dtype):
        state = original(module, weight, compression_format, dtype)
        state[f"{module}.weight_packed"][0, 0] ^= 1  # the first weight's code moved by one
        return state

    monkeypatch.setattr(ct, "compressed_linear_state", one_code_off)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--output", str(tmp_path / "ct")]) == 2
    assert "do not hold the run's integers" in _one_line_error(capsys)
    assert not (tmp_path / "ct").exists()


def test_evaluate_labels_an_exported_gguf_by_its_type_and_real_size(tmp_path, calibrated_run):
    import torch

    from omniquant_pl.config import EvalConfig, ModelConfig, QuantConfig
    from omniquant_pl.eval.runner import evaluate_target, resolve_target
    from omniquant_pl.export import ExportConfig, export_run

    run = calibrated_run(wbits=4, group_size=32, symmetric=True, grid="gguf")
    report = export_run(run, ExportConfig(format="gguf", gguf_type="Q4_0", output=str(tmp_path / "g")))
    cfg = EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=2, baselines=[])
    target = resolve_target(ModelConfig(str(tmp_path / "g"), gguf_file=report["file"]))
    methods = evaluate_target(target, cfg, [], QuantConfig(), torch.device("cpu"))["methods"]
    assert list(methods) == ["omniquant"]
    label = methods["omniquant"]
    assert label["bits"] == "W4A16 (Q4_0)" and label["format"] == "GGUF Q4_0"
    assert label["packed_bytes"] == label["disk_bytes"] == (tmp_path / "g" / report["file"]).stat().st_size


def test_output_inside_the_runs_own_data_is_refused(tmp_path, calibrated_run, capsys):
    run = calibrated_run(wbits=4, group_size=32)
    capsys.readouterr()
    for inside in ("model", "quantized/ct", "learned"):
        assert cli.main(["export", str(run), "--output", str(run / inside)]) == 2
        assert "inside the run's own" in _one_line_error(capsys)


def test_compressed_tensors_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, calibrated_run, capsys,
                                                                                   monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    run = calibrated_run(wbits=4, group_size=32)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--output", str(tmp_path / "ct")]) == 2
    line = _one_line_error(capsys)
    assert "disk is full" in line and "No space left on device" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_exporting_a_stopped_run_says_how_many_blocks_finished_and_how_to_resume(tmp_path, calibrated_run, capsys):
    import json

    run = _copy_run(calibrated_run(wbits=4, group_size=32), tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["blocks"] = results["blocks"][:1]
    (run / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert cli.main(["export", str(run)]) == 2
    line = _one_line_error(capsys)
    assert "finished 1 of 2 blocks" in line and f"--config {run / 'config.yaml'} --resume true" in line, line


def test_two_exports_into_one_output_leave_the_first_and_refuse_the_second_in_one_line(tmp_path, calibrated_run,
                                                                                       capsys, monkeypatch):
    import omniquant_pl.export as export

    run = calibrated_run(wbits=4, group_size=32)
    destination = tmp_path / "out"
    real = export.get_exporter("compressed-tensors")

    def racing(run_, options, staging):  # another export publishes while this one is writing
        report = real(run_, options, staging)
        destination.mkdir(exist_ok=True)
        (destination / "export.json").write_text("{}")
        return report

    monkeypatch.setattr(export, "get_exporter", lambda name: racing)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--output", str(destination)]) == 2
    assert "filled by another export" in _one_line_error(capsys)
    assert [p.name for p in destination.iterdir()] == ["export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
