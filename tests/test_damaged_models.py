"""Damaged, crafted or hostile weight files end in one line naming the file's problem, never a traceback."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import cli

EVAL = ["--eval.datasets", "[pydoc]", "--eval.seqlen", "64", "--eval.max_windows", "1"]


def _damaged(kind: str, source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "header-size-2^62":
        weights.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif kind == "offset-beyond-the-file":
        size = struct.unpack("<Q", data[:8])[0]
        header = data[8:8 + size].decode().replace('"data_offsets":[0,', '"data_offsets":[1000000000000,', 1)
        header = header.encode().ljust(size)[:size]
        weights.write_bytes(data[:8] + header + data[8 + size:])
    elif kind == "malicious-pickle":
        weights.unlink()

        class Payload:
            def __reduce__(self):
                return (Path.touch, (folder / "pwned",))

        import pickle

        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    return folder


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "damaged safetensors file"),
    ("header-size-2^62", "damaged safetensors file"),
    ("offset-beyond-the-file", "damaged safetensors file"),
    ("malicious-pickle", "it was not run"),
])
def test_evaluate_refuses_a_damaged_or_hostile_weight_file_in_one_line(kind, fragment, tmp_path, tiny_model_dir, capsys):
    folder = _damaged(kind, tiny_model_dir, tmp_path / "model")
    capsys.readouterr()
    assert cli.main(["evaluate", "--model.name_or_path", str(folder), *EVAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "model" in err[0], err
    assert not (folder / "pwned").exists()  # the pickle's code never ran
