"""The output model folder written block by block, so the whole model is never in memory.

Shard 1 holds the tensors outside the blocks (written last, by transformers' own save_pretrained
with the config, the generation config and any remote code), shard i + 2 block i (written as the
block finishes, atomically); ``model.safetensors.index.json`` lists them all at the end. The result
loads with ``AutoModelForCausalLM.from_pretrained`` like a folder save_pretrained wrote.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.io import atomic_save_safetensors_file, atomic_write_json
from omniquant_pl.streaming.shards import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_tensors, tensor_names

SHARD_METADATA = {"format": "pt"}  # what save_pretrained writes (from_pretrained checks it)


def data_bytes(path: Path) -> int:
    """Bytes of a safetensors file's tensors: its size less the 8-byte header length and the header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header


class ShardWriter:
    """Writes `num_blocks` block shards and the rest of a model into `folder`."""

    def __init__(self, folder: Path, num_blocks: int) -> None:
        self.folder = Path(folder)
        self.num_blocks = num_blocks
        self.total = num_blocks + 1

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def block_path(self, index: int) -> Path:
        return self.folder / self.shard_name(index + 2)

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Block `index`'s tensors, under their full names (``model.layers.<index>.``)."""
        atomic_save_safetensors_file(tensors, self.block_path(index), SHARD_METADATA)

    def read_block(self, index: int, prefix: str) -> dict[str, torch.Tensor]:
        """What write_block wrote, keyed without `prefix`."""
        path = self.block_path(index)
        return read_tensors(path, tensor_names(path), prefix)

    def write_rest(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors outside the blocks as shard 1, with everything else save_pretrained writes
        (config.json, generation_config.json, remote code), then the index."""
        missing = [index for index in range(self.num_blocks) if not self.block_path(index).is_file()]
        if missing:
            raise OmniQuantError(f"the streamed model in {self.folder} lacks the shards of blocks {missing[:5]}; "
                                 "run the calibration again with --resume true (it rewrites every block)")
        scratch = Path(tempfile.mkdtemp(prefix=".rest.", dir=self.folder))
        try:
            model.save_pretrained(scratch, state_dict=tensors, max_shard_size=2**62)
            for path in scratch.iterdir():
                target = self.shard_name(1) if path.name == SAFETENSORS_SINGLE else path.name
                os.replace(path, self.folder / target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.write_index()

    def write_index(self) -> None:
        shards = [self.shard_name(number) for number in range(1, self.total + 1)]
        weight_map = {name: shard for shard in shards for name in tensor_names(self.folder / shard)}
        total = sum(data_bytes(self.folder / shard) for shard in shards)
        atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                          self.folder / SAFETENSORS_INDEX)

