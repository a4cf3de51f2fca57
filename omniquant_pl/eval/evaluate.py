"""The one evaluation path: perplexity on every dataset and zero-shot tasks of a model as it is now.

Used by the calibration run (callbacks/perplexity.py) and by `omniquant evaluate` (eval/runner.py),
with one failure policy: a dataset or task set that cannot be loaded or run (offline, a missing
file, lm-eval not installed) is skipped with a warning and recorded in `EvalResults.skipped`, shown
in every summary, so a long calibration or evaluation is never lost to one missing source.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from omniquant_pl.config import EvalConfig
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.results import EvalResults, Perplexity

log = logging.getLogger(__name__)

STREAMED_TASKS = ("zero-shot tasks need the whole model on one device and this run streams it (model.streaming); run "
                  "them on the saved model where it fits: omniquant evaluate <output_dir> --eval.tasks [...]")


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, OmniQuantError) else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def evaluate_into(results: EvalResults, method: str, model: nn.Module, tokenizer, cfg: EvalConfig,
                  device: torch.device, evaluate: Callable | None = None,
                  progress: Callable[[str], Callable[[int, int], None]] | None = None) -> None:
    """Evaluate `model` (as `method`: fp, rtn, omniquant) on `cfg`'s datasets and tasks into `results`.
    `evaluate`: a block-by-block evaluator for a streamed model (no tasks then); `progress(description)`
    returns the `on_batch(done, total)` of a progress bar for one dataset."""
    from omniquant_pl.eval.perplexity import perplexity_on_source

    table = results.perplexity.setdefault(method, {})
    for dataset in cfg.datasets:
        on_batch = progress(f"{method} perplexity on {dataset}") if progress is not None else None
        try:
            with torch.no_grad():
                table[dataset] = Perplexity.from_dict(perplexity_on_source(
                    model, tokenizer, dataset, cfg.seqlen, cfg.max_windows, cfg.batch_size, device, evaluate=evaluate,
                    on_batch=on_batch))
        except OmniQuantError as err:
            log.warning("skipping perplexity on %s: %s", dataset, err)
            results.skipped[dataset] = str(err)
            continue
        log.info("%s perplexity on %s: %.3f (%d windows)", method, dataset, table[dataset].ppl, table[dataset].windows)
    if cfg.tasks:
        _evaluate_tasks(results, method, model, tokenizer, cfg, device, streamed=evaluate is not None)


def _evaluate_tasks(results: EvalResults, method: str, model: nn.Module, tokenizer, cfg: EvalConfig,
                    device: torch.device, streamed: bool) -> None:
    if streamed:
        log.warning("skipping zero-shot tasks %s: %s", cfg.tasks, STREAMED_TASKS)
        results.skipped["tasks"] = STREAMED_TASKS
        return
    try:
        from omniquant_pl.eval.zeroshot import run_tasks

        with torch.no_grad():
            table = run_tasks(model, tokenizer, cfg.tasks, cfg.num_fewshot, cfg.task_limit, cfg.task_include_path,
                              max(cfg.batch_size, 8), device)
    except Exception as err:  # noqa: BLE001 - a task that cannot load (no network, ...) is a recorded skip
        log.warning("skipping zero-shot tasks %s: %s", cfg.tasks, _reason(err))
        results.skipped["tasks"] = _reason(err)
        return
    results.zeroshot[method] = table
    for task, result in table.items():
        log.info("%s %s: acc %s acc_norm %s", method, task, result.get("acc"), result.get("acc_norm"))
