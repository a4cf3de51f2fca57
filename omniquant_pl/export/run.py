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
from omniquant_pl.export.gguf_experts import PER_EXPERT_KEY, PER_EXPERT_ROLES, expert_count, split_gate_up, stack_key
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
    def open(cls, run_dir: Path, experts_ok: bool = False) -> CalibratedRun:
        """Open a finished run; one-line errors for what is missing or unfinished (and for a mixture of
        experts unless the caller writes expert tensors: `experts_ok`)."""
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
        if spec.experts is not None and not experts_ok:
            raise OmniQuantError(f"'{run_dir}' is a {spec.name} model: its expert tensors "
                                 f"({', '.join(spec.expert_tensors)}) are written by --format gguf only; export it "
                                 f"with --format gguf, or use the fake-quantized model in '{model_dir}'")
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

    def _expert_owned(self, key: str) -> bool:
        """Whether a saved tensor is one of a block's expert tensors (fused, or one expert's)."""
        if self.spec.experts is None or not key.startswith(f"{self.spec.backbone}.{self.spec.layers}."):
            return False
        return PER_EXPERT_KEY.search(key) is not None or key.endswith(self.spec.expert_tensors)

    def expert_stacks(self, block: int, check: bool = True) -> dict[str, QuantizedWeight]:
        """Block `block`'s expert codes as llama.cpp's stacks (gate, up, down: (experts·rows, in) each),
        checked against the saved model's expert tensors unless `check` is False (a second read of
        stacks already checked)."""
        experts = self.spec.experts
        codes = self.block_codes(block)
        fused = {name: codes[f"{experts.module}.{name}"] for name in (experts.gate_up, experts.down)}
        count = expert_count(self.hf_config)
        gate, up = split_gate_up(fused[experts.gate_up], count)
        stacks = {"gate": gate, "up": up, "down": fused[experts.down]}
        if check:
            self._check_expert_tensors(block, fused, stacks, count)
        return stacks

    def _check_expert_tensors(self, block: int, fused: dict[str, QuantizedWeight], stacks: dict[str, QuantizedWeight],
                              count: int) -> None:
        """The saved model's expert tensors of `block` (per expert, as transformers saves them, or fused)
        must be the dequantized codes, bit for bit; one-line errors otherwise."""
        for name, weight in fused.items():
            if problems := weight.problems():
                raise OmniQuantError(f"the codes of block {block}'s {name} are not valid ({'; '.join(problems)}): "
                                     "re-run calibrate into a new output_dir")
        prefix, module = self.block_prefix(block), self.spec.experts.module
        saved = {key: PER_EXPERT_KEY.search(key) for key in self.tensors.keys()  # noqa: SIM118 (not a dict)
                 if key.startswith(prefix) and self._expert_owned(key)}
        for key, match in saved.items():
            tensor = self.tensors.get(key)
            if match is None:  # a fused 3-D tensor
                expected = fused[key.removeprefix(f"{prefix}{module}.")].dequantize(tensor.dtype).reshape(tensor.shape)
            else:
                stack = PER_EXPERT_ROLES.get(match[2])
                expected = None if stack is None else one_expert(stacks[stack], int(match[1]), count).dequantize(tensor.dtype)
            if expected is None or not torch.equal(expected, tensor):
                raise OmniQuantError(f"{key} in {self.model_dir.name}/ does not equal the run's codes for it (the saved "
                                     "model was changed or comes from another run); re-run calibrate into a new output_dir")
        if len(saved) not in (2, 3 * count):
            raise OmniQuantError(f"block {block} of {self.model_dir.name}/ holds {len(saved)} expert tensors, not {count} "
                                 "experts' gate, up and down: re-run calibrate into a new output_dir")

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
        if not torch.equal(codes[name].dequantize(saved.dtype).reshape(saved.shape), saved):
            raise OmniQuantError(
                f"{key} in {self.model_dir.name}/ does not equal the run's codes for it (the saved model was "
                "changed or comes from another run); re-run calibrate into a new output_dir"
            )
        return codes[name]

    def tensors_in_order(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Every saved tensor by name, block by block: the quantized linears as their (checked)
        codes, everything else as the saved tensor; a mixture's experts last, as llama.cpp's stacks
        (`expert_stacks`, keyed by `gguf_experts.stack_key`)."""
        linears = self.linear_keys()
        for key in sorted(self.tensors.keys(), key=lambda k: (linears.get(k, (-1, ""))[0], k)):
            if key in linears:
                yield key, self.quantized_weight(key, *linears[key])
            elif not self._expert_owned(key):
                yield key, self.tensors.get(key)
        if self.spec.experts is not None:  # llama.cpp's stacks, from the codes (checked against the saved tensors)
            for block in range(self.num_blocks):
                for stack, codes in self.expert_stacks(block).items():
                    yield stack_key(self.block_prefix(block), self.spec.experts.module, stack), codes


def one_expert(stack: QuantizedWeight, index: int, experts: int) -> QuantizedWeight:
    """Expert `index`'s rows of a stack of `experts` experts' (experts·rows, in) codes."""
    rows = stack.shape[0] // experts
    return stack.map_rows(lambda t: t[index * rows:(index + 1) * rows])
