"""A finished calibration run as exporters read it: settings, saved model tensors and the codes.

The block linears come from the run's integer codes (`quantized/block_XXX.safetensors`), checked
against the saved fused model (`model/`): the saved weight must equal the dequantized codes in
the saved dtype, bit for bit, or the export is refused. Everything else (embeddings, norms with
LET folded in, the head, config, tokenizer) comes from `model/`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.registry import get_arch_for_config
from omniquant_pl.config import QuantConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.quant.codes import QuantizedWeight, load_block_codes
from omniquant_pl.results import RunResults, read_results

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# tokenizer and generation settings, copied next to an exported Hugging Face model
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class SafetensorsFolder:
    """Read tensors by name from a saved model folder (one file or shards with an index)."""

    def __init__(self, folder: Path) -> None:
        if (folder / WEIGHTS_INDEX).is_file():
            weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), folder / WEIGHTS_FILE)
        else:
            raise OmniQuantError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}; was the model saved?")

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


@dataclass
class CalibratedRun:
    run_dir: Path
    results: RunResults
    quant: QuantConfig
    spec: ArchSpec
    model_dir: Path
    hf_config: object  # transformers PretrainedConfig of the saved model
    tensors: SafetensorsFolder
    _codes: dict[int, dict[str, QuantizedWeight]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run_dir: Path) -> CalibratedRun:
        """Open a finished run; one-line errors for what is missing or unfinished."""
        from transformers import AutoConfig

        results_path = run_dir / "results.json"
        if not results_path.is_file():
            raise OmniQuantError(f"'{run_dir}' is not an OmniQuant output directory (no results.json); "
                                 "give the output_dir of a calibrate run")
        results = read_results(results_path)
        model_dir = run_dir / "model"
        if not (model_dir / "config.json").is_file():
            raise OmniQuantError(f"'{run_dir}' has no saved model (model/config.json): export needs a run calibrated "
                                 "with save_model: true; re-run calibrate with --save_model true --resume true")
        hf_config = AutoConfig.from_pretrained(model_dir)
        layers = int(hf_config.num_hidden_layers)
        finished = results.finished_blocks
        if finished < layers:
            raise OmniQuantError(f"'{run_dir}' finished {finished} of {layers} blocks (it was stopped); finish it "
                                 f"with: omniquant calibrate --config {run_dir / 'config.yaml'} --resume true, then export")
        quant = QuantConfig(**results.config["quant"])
        spec = get_arch_for_config(hf_config)
        if spec.experts is not None:
            raise OmniQuantError(f"'{run_dir}' is a {spec.name} model: its expert tensors "
                                 f"({', '.join(spec.expert_tensors)}) have codes, but no export format writes them yet; "
                                 f"use the fake-quantized model in '{model_dir}' instead")
        return cls(run_dir, results, quant, spec, model_dir, hf_config,
                   SafetensorsFolder(model_dir))

    # -- the run's settings --------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def model_config(self) -> dict:
        """The run's `model` settings (name_or_path, gguf_file, ...)."""
        return self.results.config["model"]

    def block_prefix(self, index: int) -> str:
        return f"{self.spec.backbone}.{self.spec.layers}.{index}."

    def side_files(self) -> list[Path]:
        return [self.model_dir / name for name in SIDE_FILES if (self.model_dir / name).is_file()]

    # -- the integers ------------------------------------------------------------------------
    def block_codes(self, index: int) -> dict[str, QuantizedWeight]:
        if index not in self._codes:
            self._codes = {index: load_block_codes(self.run_dir, index)}  # one block in memory at a time
        return self._codes[index]

    def linear_keys(self) -> dict[str, tuple[int, str]]:
        """Saved weight name -> (block index, linear name) of every quantized linear."""
        return {f"{self.block_prefix(i)}{name}.weight": (i, name)
                for i in range(self.num_blocks) for name in self.spec.linear_names}

    def quantized_weight(self, key: str, block: int, name: str) -> QuantizedWeight:
        """The codes of one linear, checked against the saved model: its stored weight must be the
        dequantized codes in the stored dtype, bit for bit."""
        codes = self.block_codes(block)
        if name not in codes:
            raise OmniQuantError(f"the codes of block {block} have no '{name}' (the run's files are inconsistent); "
                                 "re-run calibrate into a new output_dir")
        problems = codes[name].problems()
        if problems:
            raise OmniQuantError(f"the codes of {key} are not valid {codes[name].bits}-bit codes ({'; '.join(problems)}): "
                                 "the run's quantized/ files were changed or damaged; re-run calibrate into a new output_dir")
        saved = self.tensors.get(key)
        if not torch.equal(codes[name].dequantize(saved.dtype), saved):
            raise OmniQuantError(
                f"{key} in {self.model_dir.name}/ does not equal the run's codes for it (the saved model was "
                "changed or comes from another run); re-run calibrate into a new output_dir"
            )
        return codes[name]

    def tensors_in_order(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Every saved tensor by name, block by block: the quantized linears as their (checked)
        codes, everything else as the saved tensor."""
        linears = self.linear_keys()
        for key in sorted(self.tensors.keys(), key=lambda k: (linears.get(k, (-1, ""))[0], k)):
            if key in linears:
                yield key, self.quantized_weight(key, *linears[key])
            else:
                yield key, self.tensors.get(key)
