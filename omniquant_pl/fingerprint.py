"""What identifies the weights a run calibrates, cheaply, so that a resumed run can tell that the
model at the configured path is still the one its finished blocks came from.

The fingerprint hashes, for every weight file of the model folder (safetensors shards and their
index, `.bin`, `.gguf`): its name, its size, and its first and last 64 KiB. A safetensors file
starts with its header (every tensor's name, dtype, shape and byte offsets), a GGUF file with its
metadata and tensor table, so a different model, a re-quantized file or a changed shard changes
the fingerprint, at a cost of a few reads whatever the model's size.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from omniquant_pl.config import ModelConfig
from omniquant_pl.eval.size import WEIGHT_SUFFIXES
from omniquant_pl.models import resolve_model_path

INDEX_SUFFIX = ".index.json"
SAMPLE_BYTES = 1 << 16


def model_folder(model: ModelConfig) -> Path | None:
    """The local folder holding the model's files: the path itself, or the hub cache's snapshot
    (None when a hub model is not downloaded yet)."""
    path = Path(resolve_model_path(model.name_or_path)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not in the cache: nothing to fingerprint yet
        return None


def weight_files(folder: Path, model: ModelConfig) -> list[Path]:
    """The files the weights are read from (only the named GGUF where the model is one)."""
    if model.gguf_file:
        return [folder / model.gguf_file]
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(INDEX_SUFFIX)))


def model_fingerprint(model: ModelConfig) -> str | None:
    """A 16-hex-digit hash of the model's weight files (see the module), None where they are not local."""
    folder = model_folder(model)
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in weight_files(folder, model):
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                handle.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
