"""The fused fake-quant model saved with `save_pretrained`, its quantization in ``config.omniquant``
(results.SavedModelMeta), written beside `<output_dir>/model` and renamed into place when complete."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from omniquant_pl.config import QuantConfig
from omniquant_pl.io import publish_modes
from omniquant_pl.quant.activation_hooks import ATTENTION_NAME
from omniquant_pl.results import SavedModelMeta
from omniquant_pl.streaming.blocks import StreamedBlocks

MODEL_DIR = "model"


def save_model(model: nn.Module, tokenizer: Any, quant: QuantConfig, output_dir: Path,
               streamed: StreamedBlocks | None = None) -> Path:
    """Save the fused model (plain transformers modules) and its tokenizer to `output_dir/model`.
    A full disk never leaves a model/ without weights behind (streaming: the staging folder already
    holds the finished blocks' shards)."""
    path = Path(output_dir) / MODEL_DIR
    model.config.use_cache = True
    model.config.omniquant = SavedModelMeta.of_run(quant).to_dict()
    attention = model.config._attn_implementation
    if attention == ATTENTION_NAME:  # save a config that plain transformers loads
        model.set_attn_implementation("sdpa")
    remove_stale_staging(Path(output_dir), keep=streamed.staging if streamed is not None else None)
    staging = streamed.staging if streamed is not None else Path(tempfile.mkdtemp(prefix=".model.", dir=output_dir))
    try:
        if streamed is not None:
            streamed.save_rest()
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        publish_modes(staging)  # as readable as the user's other files (mkdtemp makes it private)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if attention == ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
    return path


def remove_stale_staging(output_dir: Path, keep: Path | None) -> None:
    """Staging folders of the saved model left by an earlier session of this run (killed while saving,
    or streamed and now resumed without streaming): only one process saves into a run folder."""
    for folder in output_dir.glob(".model.*"):
        if folder != keep and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def saved_meta(model: nn.Module) -> SavedModelMeta | None:
    """The quantization a loaded model records (None: a model this project did not save)."""
    return SavedModelMeta.from_dict(getattr(model.config, "omniquant", None))
