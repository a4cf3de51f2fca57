"""Reading named tensors from a folder of safetensors shards, without loading the rest.

A Hugging Face model folder holds one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). `ShardFolder` opens
only the shards that hold the tensors asked for and copies only those tensors out of them.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from omniquant_pl.errors import ConfigError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf")


class NotStreamable(Exception):
    """The model cannot be streamed from its files; the message says why (one clause, no advice)."""


def weight_bytes(folder: Path, gguf_file: str | None = None) -> int:
    """Bytes of the weight files the model would load from (safetensors first, as transformers does)."""
    folder = Path(folder)
    if gguf_file:
        return (folder / gguf_file).stat().st_size
    files = list(folder.glob("*.safetensors")) or [p for p in folder.iterdir() if p.suffix in OTHER_WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files)


def read_tensors(path: Path, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """`names` read from one safetensors file, keyed without `prefix`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name[len(prefix):]: handle.get_tensor(name) for name in names}


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), checked against the
    file's size; a damaged file is a one-line ConfigError."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ConfigError(f"model shard {path} is damaged (its header does not fit the file's {size} bytes); "
                              "download the model's files again")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"model shard {path} is damaged (its header is not JSON); download the model's files "
                              "again") from None
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ConfigError(f"model shard {path} is truncated ({size} bytes, its header needs {8 + length + end}); "
                          "download the model's files again")
    return tensors


def tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


class ShardFolder:
    """The safetensors weights of one model folder: which file holds each tensor."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.weight_map = self._weight_map()  # tensor name -> file name

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:  # a full load cannot read them either
                raise ConfigError(f"{index} lists shards that are not there ({', '.join(missing[:3])}); download the "
                                  "model's files again")
            return dict(weight_map)
        single = self.folder / SAFETENSORS_SINGLE
        if single.is_file():
            return dict.fromkeys(tensor_names(single), SAFETENSORS_SINGLE)
        found = sorted(p.name for p in self.folder.iterdir() if p.suffix in OTHER_WEIGHT_SUFFIXES)
        what = f"only {', '.join(found[:3])}" if found else "no weight files"
        raise NotStreamable(f"'{self.folder}' has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} ({what})")

    def tensor_dtypes(self) -> dict[str, str]:
        """Every tensor's safetensors dtype (``F32``, ``BF16``, ``I32`` ...), read from the shards'
        headers, which are checked on the way: a shard that is truncated, whose header cannot be read,
        or that lacks a tensor the index places in it is a one-line ConfigError (before any block)."""
        dtypes: dict[str, str] = {}
        for file in sorted(set(self.weight_map.values())):
            header = read_header(self.folder / file)
            listed = [name for name, where in self.weight_map.items() if where == file]
            absent = [name for name in listed if name not in header]
            if absent:
                raise ConfigError(f"the shard index of '{self.folder}' places {absent[0]} in {file}, which does not hold "
                                  "it (a wrong or mixed-up index); download the model's files again")
            dtypes.update({name: header[name]["dtype"] for name in listed})
        return dtypes

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix)]

    def read(self, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        """The named tensors (keyed without `prefix`), each shard opened once."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, in_file in by_file.items():
            tensors.update(read_tensors(self.folder / file, in_file, prefix))
        return tensors

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix` (``model.layers.3.``), keyed without it."""
        return self.read(self.names(prefix), prefix)
