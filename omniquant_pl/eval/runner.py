"""`omniquant evaluate`: perplexities and zero-shot tasks of one model under one or more methods.

Targets: a hub id or model folder (evaluated as it is: ``fp``, or ``fp``/``rtn`` baselines with
the given quantization settings), a saved OmniQuant model folder, or an OmniQuant output
directory (``results.json`` + ``model/``). The report has results.json's layout
(``perplexity[method][dataset]``, ``zeroshot[method][task]``) plus ``methods[method]`` = bits tag
and sizes, so `omniquant compare` reads both.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from omniquant_pl.config import EvalConfig, ModelConfig, QuantConfig
from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.eval.size import disk_bytes, packed_bytes
from omniquant_pl.eval.stored_format import StoredFormat, stored_format
from omniquant_pl.results import RunResults, read_results
from omniquant_pl.saved_model import saved_meta
from omniquant_pl.versions import software_versions

log = logging.getLogger(__name__)

FP_TAG = "W16A16"


@dataclass
class EvalTarget:
    model: ModelConfig  # what to load
    requested: str  # model.name_or_path as given
    run_dir: Path | None = None  # an OmniQuant output directory
    run_results: RunResults | None = None  # its results.json


def resolve_target(model: ModelConfig) -> EvalTarget:
    """A run directory evaluates its saved model/; anything else loads as given."""
    from omniquant_pl.models import resolve_model_path

    folder = Path(resolve_model_path(model.name_or_path)).expanduser()
    if not (folder / "results.json").is_file():
        return EvalTarget(model, model.name_or_path)
    if not (folder / "model" / "config.json").is_file():
        raise ConfigError(
            f"'{folder}' is an OmniQuant output directory without a saved model (model/config.json); "
            "re-run calibrate with save_model: true, or evaluate a model folder"
        )
    results = read_results(folder / "results.json")
    return EvalTarget(replace(model, name_or_path=str(folder / "model"), gguf_file=None), model.name_or_path,
                      folder, results)


def saved_quant(model: nn.Module) -> QuantConfig | None:
    """The quantization settings a saved OmniQuant model records in config.omniquant (None = FP)."""
    meta = saved_meta(model)
    return None if meta is None else meta.quant_config()


def install_saved_activation_quantizers(model: nn.Module) -> dict | None:
    """A saved weight-activation model: put its activation quantizers (and online rotations) back (they
    stay installed)."""
    meta = saved_meta(model)
    if meta is None or meta.activations is None:
        return None
    from omniquant_pl.arch import get_arch
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.quant.activation_hooks import BlockActivationQuantizers, use_quantized_attention
    from omniquant_pl.rotate import online_rotations

    spec = get_arch(model)
    use_quantized_attention(model)
    blocks = list(get_blocks(model, spec))
    rotations = online_rotations(spec, meta.rotate, meta.rotate_seed, meta.rotate_online, blocks[0])
    for block in blocks:
        BlockActivationQuantizers(block, spec, meta.activations.bits, rotations=rotations)
    return asdict(meta.activations)


def rtn_method(model: nn.Module, quant: QuantConfig) -> contextlib.AbstractContextManager:
    """RTN weights (and per-token activation quantization below 16 bits) for the context's duration."""
    from omniquant_pl.arch import get_arch
    from omniquant_pl.quant.rtn import rtn_model

    return rtn_model(model, get_arch(model), quant)


def plan_methods(model: nn.Module, baselines: list[str], quant: QuantConfig, stored: StoredFormat | None = None
                 ) -> list[tuple[str, str, QuantConfig | None, Callable[[], contextlib.AbstractContextManager]]]:
    """(method, bits tag, quant settings, context) for each evaluation of the loaded model. A model
    stored quantized (an export) is labelled by what its files hold."""
    if stored is not None and stored.by_omniquant:
        if baselines:
            raise ConfigError(f"--baselines {baselines} needs a full-precision model, but this one is an export "
                              f"({stored.format}, {stored.bits}); evaluate the original model with --baselines")
        return [("omniquant", stored.bits, None, contextlib.nullcontext)]
    saved = saved_quant(model)
    if saved is not None:
        if baselines:
            raise ConfigError(
                f"--baselines {baselines} needs a full-precision model, but this one is already quantized "
                f"({saved.tag}); evaluate the original model with --baselines, and this one without"
            )
        return [("omniquant", saved.tag, saved, contextlib.nullcontext)]
    as_stored = stored.bits if stored is not None else FP_TAG  # e.g. a GGUF from elsewhere, de-quantized on load
    if not baselines:
        return [("fp", as_stored, None, contextlib.nullcontext)]
    plans = []
    for method in dict.fromkeys(baselines):  # keep order, drop repeats
        if method == "fp":
            plans.append(("fp", as_stored, None, contextlib.nullcontext))
        else:
            plans.append(("rtn", quant.tag, quant, lambda: rtn_method(model, quant)))
    return plans


def evaluate_target(target: EvalTarget, cfg: EvalConfig, baselines: list[str], quant: QuantConfig,
                    device: torch.device, progress=None) -> dict:
    """Load the target once and evaluate every planned method (eval/evaluate.py's path and failure
    policy: a dataset or task that cannot load is a recorded skip); returns the eval.json report."""
    from omniquant_pl.eval.evaluate import evaluate_into
    from omniquant_pl.models import load_model_and_tokenizer, resolve_model_path
    from omniquant_pl.results import EvalResults

    if not cfg.datasets and not cfg.tasks:
        raise ConfigError("nothing to evaluate: give --eval.datasets [...] and/or --eval.tasks [...]")
    model, tokenizer = load_model_and_tokenizer(target.model, device)
    model.to(device)
    activations = install_saved_activation_quantizers(model)
    folder = resolve_model_path(target.model.name_or_path)
    on_disk = disk_bytes(folder, target.model.gguf_file)
    stored = stored_format(target.model, folder)
    evaluation = EvalResults()
    methods: dict[str, dict] = {}
    for method, tag, method_quant, context in plan_methods(model, baselines, quant, stored):
        started = time.perf_counter()
        with context():
            evaluate_into(evaluation, method, model, tokenizer, cfg, device, progress=progress)
        methods[method] = {
            "bits": tag, "quant": asdict(method_quant) if method_quant else None,
            "disk_bytes": None if method == "rtn" else on_disk,  # RTN is not saved anywhere
            "packed_bytes": packed_bytes(model, method_quant) if stored is None or method == "rtn" else on_disk,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if stored is not None and method != "rtn":
            methods[method]["format"] = stored.format
    report: dict = {"model": target.requested, "model_type": model.config.model_type, "methods": methods,
                    **evaluation.to_dict(), "eval": asdict(cfg), "versions": software_versions(optional=("lm-eval",
                                                                                                         "gguf"))}
    if target.run_dir is not None:
        report["run_dir"] = str(target.run_dir)
        report["calibration"] = {"quant_tag": target.run_results.quant_tag,
                                 "calibration_source": target.run_results.calibration_source}
    if activations:
        report["activations"] = activations
    return report


def report_path(run_dir: Path | None, output: str | None) -> Path | None:
    """Where eval.json goes: --output (a .json file or a folder), else the run directory, else nowhere."""
    if output:
        path = Path(output)
        return path if path.suffix == ".json" else path / "eval.json"
    return run_dir / "eval.json" if run_dir is not None else None


def check_writable(path: Path | None) -> None:
    """Fail before the (long) evaluation when the report could not be written."""
    from omniquant_pl.io import check_writable_dir

    if path is None:
        return
    if path.is_dir():
        raise OmniQuantError(f"cannot write {path}: it is a folder; give --output DIR or --output FILE.json")
    check_writable_dir(path.parent, "--output")
