"""Exports of a calibrated run to the formats inference engines load.

An exporter is one module that registers a function under a format name:

    @register_exporter("my-format")
    def export_my_format(run: CalibratedRun, options: ExportConfig, staging: Path) -> dict: ...

It reads the run (its integer codes, saved model and settings) through `CalibratedRun`, writes
its files into `staging` and returns a report (what was written, exact or approximate, checks).
`export_run` refuses bad input before any work, stages the output in a temporary folder beside
the destination and renames it into place only when everything is written: an export that
fails half-way leaves nothing behind.
"""
from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.io import publish_modes
from omniquant_pl.versions import software_versions

log = logging.getLogger(__name__)

# the built-in exporters, imported on first use (each registers itself)
BUILTIN_MODULES = ("omniquant_pl.export.compressed_tensors", "omniquant_pl.export.gguf", "omniquant_pl.export.gptq")
REPORT_NAME = "export.json"

Exporter = Callable[..., dict]
_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Decorator: make `function(run, options, staging) -> report` the exporter of format `name`."""

    def register(function: Exporter) -> Exporter:
        _EXPORTERS[name] = function
        return function

    return register


def available_formats() -> list[str]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(_EXPORTERS)


def get_exporter(name: str) -> Exporter:
    formats = available_formats()
    if name not in _EXPORTERS:
        raise ConfigError(f"unknown export format '{name}'; available: {', '.join(formats)}")
    return _EXPORTERS[name]


@dataclass
class ExportConfig:
    """What to export and how.

    Args:
        format: ``compressed-tensors`` (vLLM, transformers; 4/8-bit weights, W8A8), ``gptq`` (vLLM's gptq
            method; 2/3/4/8-bit weights) or ``gguf`` (llama.cpp, Ollama).
        output: destination folder; default ``<run_dir>/export/<format>[-<gguf_type>]``.
        gguf_type: GGUF file type: the run's own ``quant.gguf_type`` by default (exact), ``Q4_0``,
            ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0`` (exact for a run calibrated on that grid with groups
            of 32), or with
            ``requantize`` any type llama.cpp's quantizer makes (``Q2_K``, ``Q3_K_S/M/L``,
            ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``, ``F16``, ...).
        requantize: GGUF only: re-round the fused weights into ``gguf_type`` with llama.cpp's
            quantizer when the run's grid is not that type's (approximate, and said so).
        dtype: compressed-tensors and gptq: dtype of the tensors that stay in floating point (and,
            for compressed-tensors, of the scales; GPTQ stores fp16 scales) (``float32`` keeps any run's scales exactly; runs on ``quant.grid: gguf``
            have fp16 scales already). GGUF files take their types from ``gguf_type``.
    """

    format: str = "compressed-tensors"
    output: str | None = None
    gguf_type: str | None = None
    requantize: bool = False
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if self.format != "gguf" and (self.gguf_type or self.requantize):
            raise ConfigError(f"--gguf_type and --requantize apply to --format gguf only, not '{self.format}'")
        if self.gguf_type:
            self.gguf_type = self.gguf_type.upper()

    def default_output(self, run_dir: Path) -> Path:
        suffix = f"-{self.gguf_type.lower()}" if self.gguf_type else ""
        return run_dir / "export" / f"{self.format}{suffix}"


STAGING_OWNER = ".exporting-pid"  # in a staging folder while its export runs: the exporting process


RUN_DATA = ("model", "quantized", "learned", "logs", "learned_params.safetensors")  # a run's own files


def check_destination(destination: Path, run_dir: Path) -> None:
    """Refuse, before any work, an --output that is a link, a file, under a file, not empty, or inside
    the run's own data."""
    from omniquant_pl.io import check_writable_dir

    resolved = destination.resolve()
    for name in RUN_DATA:
        data = (run_dir / name).resolve()
        if resolved == data or data in resolved.parents:
            raise OmniQuantError(f"--output {destination} is inside the run's own {name}; give a folder outside it "
                                 f"(the default is {run_dir / 'export'}/<format>)")
    if destination.is_symlink():
        raise OmniQuantError(f"--output {destination} is a symbolic link (to {os.readlink(destination)}); an export "
                             "never writes through a link: give the real folder's path")
    check_writable_dir(destination, "--output")
    if destination.exists() and any(destination.iterdir()):
        raise OmniQuantError(f"--output {destination} already exists and is not empty; give another --output or remove it")


def _remove_stale_staging(destination: Path) -> None:
    """Staging folders of earlier exports to `destination` whose process is gone (killed): removed."""
    if not destination.parent.is_dir():
        return
    for folder in destination.parent.glob(f".{destination.name}.*.tmp"):
        owner = folder / STAGING_OWNER
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (OSError, ValueError):
            alive = False
        if not alive and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _staging_dir(destination: Path, run_dir: Path) -> Path:
    check_destination(destination, run_dir)
    _remove_stale_staging(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    (staging / STAGING_OWNER).write_text(str(os.getpid()))
    return staging


def export_run(run_dir: str | Path, options: ExportConfig) -> dict:
    """Export the run in `run_dir`; returns the report also written to `<output>/export.json`."""
    from omniquant_pl.export.run import CalibratedRun

    exporter = get_exporter(options.format)
    run = CalibratedRun.open(Path(run_dir), experts_ok=options.format == "gguf")
    if options.format == "gguf" and not options.gguf_type:
        if run.quant.gguf_type is None:
            raise ConfigError("--format gguf needs --gguf_type, e.g. Q4_0 or Q4_1 (see omniquant export --help); a run "
                              "calibrated with quant.gguf_type exports to its own type without it")
        options.gguf_type = run.quant.gguf_type
    destination = Path(options.output) if options.output else options.default_output(run.run_dir)
    parent_existed = destination.parent.exists()
    if options.format == "gguf" and options.dtype != "float16":
        log.warning("--dtype %s does nothing for GGUF: its types fix how every tensor is stored", options.dtype)
    staging = _staging_dir(destination, run.run_dir)
    started = time.perf_counter()
    try:
        report = exporter(run, options, staging)
        report = {"format": options.format, "run_dir": run.run_dir.name, "quant": run.quant.tag,
                  "options": {k: v for k, v in asdict(options).items() if k != "output"}, **report,
                  "seconds": round(time.perf_counter() - started, 1),
                  "versions": software_versions(optional=("compressed-tensors", "gguf", "llama-cpp-python"))}
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
        (staging / STAGING_OWNER).unlink()
        publish_modes(staging)
        try:
            if destination.exists():
                destination.rmdir()  # empty (checked above), unless another export filled it since
            staging.rename(destination)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OmniQuantError(f"--output {destination} was filled by another export while this one ran; nothing "
                                 "of this one was kept: give another --output") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not parent_existed and not any(destination.parent.iterdir()):
            destination.parent.rmdir()  # leave no empty export/ behind a refusal
        raise
    report["output"] = str(destination)
    return report


__all__ = ["ExportConfig", "available_formats", "export_run", "get_exporter", "register_exporter"]
