"""Perplexity (and zero-shot tasks, when configured) of the FP / RTN baselines before calibration
and of the quantized model after."""
from __future__ import annotations

import logging

import torch

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.eval.perplexity import perplexity_on_source
from omniquant_pl.hooks import CalibrationCallback
from omniquant_pl.quant.rtn import rtn_model

log = logging.getLogger(__name__)


class PerplexityCallback(CalibrationCallback):
    """Evaluates `sequencer.config.eval` on the whole model (moved to the accelerator for it).

    Results go to ``results["perplexity"][method][dataset]`` with method in fp / rtn / omniquant,
    and, with ``eval.tasks``, lm-eval accuracies to ``results["zeroshot"][method][task]``.
    A dataset or task set that cannot be loaded (offline, missing file, lm-eval not installed) is
    skipped with a warning and recorded, so calibration work is never lost to an evaluation problem.
    """

    def _evaluate(self, sequencer, method: str) -> None:
        cfg = sequencer.config.eval
        model = sequencer.model
        model.to(sequencer.device)
        table = sequencer.results["perplexity"].setdefault(method, {})
        try:
            for dataset in cfg.datasets:
                try:
                    result = perplexity_on_source(
                        model, sequencer.tokenizer, dataset, cfg.seqlen, cfg.max_windows,
                        cfg.batch_size, sequencer.device,
                    )
                except OmniQuantError as err:
                    log.warning("skipping perplexity on %s: %s", dataset, err)
                    sequencer.results.setdefault("skipped_eval", {})[dataset] = str(err)
                    continue
                table[dataset] = result
                log.info("%s perplexity on %s: %.3f (%d windows)", method, dataset, result["ppl"], result["windows"])
            if cfg.tasks:
                self._run_tasks(sequencer, method)
        finally:
            model.to("cpu")
            if sequencer.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _run_tasks(sequencer, method: str) -> None:
        cfg = sequencer.config.eval
        try:
            from omniquant_pl.eval.zeroshot import run_tasks

            with torch.no_grad():
                table = run_tasks(sequencer.model, sequencer.tokenizer, cfg.tasks, cfg.num_fewshot, cfg.task_limit,
                                  cfg.task_include_path, max(cfg.batch_size, 8), sequencer.device)
        except Exception as err:  # noqa: BLE001 - a task that cannot load (no network, ...) never costs the calibration
            message = str(err) if isinstance(err, OmniQuantError) else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            log.warning("skipping zero-shot tasks %s: %s", cfg.tasks, message)
            sequencer.results.setdefault("skipped_eval", {})["tasks"] = message
            return
        sequencer.results.setdefault("zeroshot", {})[method] = table
        for task, result in table.items():
            log.info("%s %s: acc %s acc_norm %s", method, task, result.get("acc"), result.get("acc_norm"))

    def on_calibration_start(self, sequencer) -> None:
        # a resumed run keeps the baselines measured before it was interrupted
        baselines = [b for b in sequencer.config.eval.baselines if b not in sequencer.results["perplexity"]]
        if "fp" in baselines:
            self._evaluate(sequencer, "fp")
        if "rtn" in baselines:
            with rtn_model(sequencer.model, sequencer.spec, sequencer.config.quant):
                self._evaluate(sequencer, "rtn")

    def on_calibration_end(self, sequencer, results) -> None:
        self._evaluate(sequencer, "omniquant")
