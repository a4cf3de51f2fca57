"""What makes a resumed run the same run: the checkpoint's config (checkpoint.py), the model's
weight files (fingerprint.py), the calibration token ids, and the software stack (a change is allowed, said and recorded).

`start_or_resume` is read before the model loads: a damaged checkpoint, another config, or finished
blocks without ``--resume true`` are refused there, with nothing written.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from omniquant_pl.checkpoint import CHECKPOINT, existing_progress, load_checkpoint
from omniquant_pl.config import RunConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.fingerprint import model_fingerprint
from omniquant_pl.plan import RunPlan
from omniquant_pl.results import RunResults
from omniquant_pl.versions import changed_versions, software_versions

log = logging.getLogger(__name__)

Restored = tuple[RunResults, dict[str, torch.Tensor]]  # results so far, learned parameters of finished blocks


def start_or_resume(config: RunConfig) -> Restored | None:
    """The checkpoint to continue (``resume: true``), None for a fresh run; refuses a folder with finished
    blocks unless resuming, and a checkpoint whose blocks came from other weights than the model's now."""
    output_dir = Path(config.output_dir)
    if config.resume:
        restored = load_checkpoint(output_dir, config)
        if restored is not None:
            check_same_model(restored[0], config, output_dir)
        return restored
    progress = existing_progress(output_dir)
    if progress:
        raise OmniQuantError(f"{output_dir} already holds a checkpoint with {progress} finished blocks; add "
                             "--resume true to continue it, or choose another output_dir")
    return None


def run_folder_named(config_files: list[Path], output_dir: str | Path) -> Path | None:
    """The run folder a ``--resume true`` acts on when the user named it through its config.yaml: the
    folder of the last config file given when it holds a checkpoint and is not `output_dir` (a copied
    run folder, or a relative output_dir read from another working directory); else None."""
    if not config_files:
        return None
    folder = Path(config_files[-1]).resolve().parent
    if not (folder / CHECKPOINT).is_file() or folder == Path(output_dir).resolve():
        return None
    return folder


def check_same_model(results: RunResults, config: RunConfig, output_dir: Path) -> None:
    """The model at the configured path must be the one the finished blocks were calibrated on."""
    now = model_fingerprint(config.model)
    if results.model_fingerprint is not None and now is not None and now != results.model_fingerprint:
        raise OmniQuantError(
            f"cannot resume {output_dir}: the model at {config.model.name_or_path} is not the one its "
            f"{results.finished_blocks} finished blocks were calibrated on (weight files changed: fingerprint "
            f"{now}, was {results.model_fingerprint}); restore that model, or calibrate into a new output_dir"
        )


def results_so_far(restored: Restored | None, config: RunConfig, model_type: str, plan: RunPlan
                   ) -> tuple[RunResults, dict[str, torch.Tensor]]:
    """This session's results (a resumed run's so far, marked as resumed) with its plan, and the
    learned parameters so far."""
    if restored is None:
        results, learned = RunResults(config=config.to_dict(), quant_tag=config.quant.tag, model_type=model_type,
                                      versions=software_versions()), {}
    else:
        results, learned = restored
        mark_resumed(results, Path(config.output_dir))
    results.plan = plan
    results.model_fingerprint = results.model_fingerprint or model_fingerprint(config.model)
    return results, learned


def mark_resumed(results: RunResults, output_dir: Path) -> None:
    """Record where this session resumed; warn and record when the software stack changed since."""
    finished = results.finished_blocks
    results.resumed_at_block = finished
    log.info("resuming %s at block %d", output_dir, finished)
    changed = changed_versions(results.versions)
    if changed:  # the blocks of one run come from two stacks: say so, and record it
        log.warning("resuming with other software than the finished blocks used (%s); the blocks from %d on are "
                    "calibrated with it", ", ".join(changed), finished)
        results.resumed_with_versions.append({"at_block": finished, "versions": software_versions()})


def check_calibration_ids(results: RunResults, windows: torch.Tensor, source: str, output_dir: Path) -> None:
    """Record the calibration token ids' hash; a resumed run must see the same ids (the text found,
    e.g. through a relative path, and the tokenizer both decide them)."""
    digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]
    if results.calibration_ids_sha256 is not None and results.calibration_ids_sha256 != digest:
        raise OmniQuantError(
            f"cannot resume {output_dir}: this run's calibration token ids differ from the checkpoint's (text now "
            f"{source!r}, was {results.calibration_source!r}): the calibration text or the tokenizer changed; use "
            "the original ones, or a new output_dir"
        )
    results.calibration_source = source
    results.calibration_ids_sha256 = digest
