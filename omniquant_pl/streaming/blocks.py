"""A streamed model's blocks: on the meta device except while the run uses one.

`load_original(i)` reads block i's weights from the input shards (calibration, replay, the FP/RTN
baselines); `finish(i)` writes the finished (fused) block to the output model's staging folder
and puts its parameters back on the meta device; `load_current(i)` reads the block as the run has
it now (the finished one once written, else the original: what the evaluation sees).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from omniquant_pl.streaming.load import blocks_prefix, fill, release
from omniquant_pl.streaming.shards import ShardFolder
from omniquant_pl.streaming.writer import ShardWriter

STAGING = ".model.streamed"  # <output_dir>/.model.streamed: the output model's shards until it is complete


class StreamedBlocks:
    """Loads, writes and releases the blocks of `model` (whose parameters start on the meta device)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, source: ShardFolder, output_dir: Path,
                 writes_files: bool = True) -> None:
        self.model, self.blocks, self.source = model, blocks, source
        self.prefix = blocks_prefix(model, blocks)  # "model.layers."
        self.writer = ShardWriter(Path(output_dir) / STAGING, len(blocks))
        self.writes_files = writes_files
        self.written: set[int] = set()  # blocks whose finished shard this run wrote
        if writes_files:  # every block is (re)written by this run, calibrated or replayed
            shutil.rmtree(self.writer.folder, ignore_errors=True)
            self.writer.folder.mkdir(parents=True)

    @property
    def staging(self) -> Path:
        return self.writer.folder

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}{index}."

    def load_original(self, index: int) -> nn.Module:
        """Block `index` with the input checkpoint's weights (on the CPU, in the model's dtype)."""
        block = self.blocks[index]
        fill(block, self.source.read_prefix(self.block_prefix(index)))
        return block

    def load_current(self, index: int) -> nn.Module:
        """Block `index` as the run has it: finished (fused) once this run wrote it, else original."""
        if index not in self.written:
            return self.load_original(index)
        block = self.blocks[index]
        fill(block, self.writer.read_block(index, self.block_prefix(index)))
        return block

    def release(self, index: int) -> None:
        release(self.blocks[index])

    def finish(self, index: int) -> None:
        """Write finished block `index` (on the CPU, in the model's dtype) and release it."""
        block = self.blocks[index]
        if self.writes_files:
            prefix = self.block_prefix(index)
            self.writer.write_block(index, {prefix + name: t for name, t in block.state_dict().items()})
            self.written.add(index)
        release(block)

    def save_rest(self) -> Path:
        """Complete the staging folder: the tensors outside the blocks, configs and the index."""
        rest = {name: t for name, t in self.model.state_dict().items() if not name.startswith(self.prefix)}
        self.writer.write_rest(self.model, rest)
        return self.staging

    def discard(self) -> None:
        """Remove the staging folder (a run that does not save the model)."""
        shutil.rmtree(self.staging, ignore_errors=True)
