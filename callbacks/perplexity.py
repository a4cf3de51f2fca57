"""Perplexity (and zero-shot tasks, when configured) of the FP / RTN baselines before calibration
and of the quantized model after."""
from __future__ import annotations

import contextlib
import logging

import torch

from omniquant_pl.errors import OmniQuantError
from omniquant_pl.eval.perplexity import perplexity_on_source
from omniquant_pl.hooks import CalibrationCallback
from omniquant_pl.quant.rtn import rtn_model
from omniquant_pl.streaming.evaluate import streamed_evaluator

log = logging.getLogger(__name__)


class PerplexityCallback(CalibrationCallback):
    """Evaluates `sequencer.config.eval` on the whole model (moved to the accelerator for it).

    Results go to ``results["perplexity"][method][dataset]`` with method in fp / rtn / omniquant,
    and, with ``eval.tasks``, lm-eval accuracies to ``results["zeroshot"][method][task]``.
    A dataset or task set that cannot be loaded (offline, missing file, lm-eval not installed) is
    skipped with a warning and recorded, so calibration work is never lost to an evaluation problem.
    A streamed model (model.streaming) is evaluated block by block instead (streaming/evaluate.py;
    the same perplexity), without zero-shot tasks.
    """

    rank_zero_only = True  # data-parallel runs: rank 0 evaluates, the others wait

    def _evaluate(self, sequencer, method: str) -> None:
        cfg = sequencer.config.eval
        model = sequencer.model
        streamed = getattr(sequencer, "streamed", None)
        evaluate = None  # the whole model on the device
        if streamed is None:
            model.to(sequencer.device)
        else:  # each block as the run has it now (finished ones fused); RTN quantizes each as it loads
            evaluate = streamed_evaluator(model, sequencer.spec, streamed,
                                          sequencer.config.quant if method == "rtn" else None)
        table = sequencer.results["perplexity"].setdefault(method, {})
        try:
            for dataset in cfg.datasets:
                try:
                    result = perplexity_on_source(
                        model, sequencer.tokenizer, dataset, cfg.seqlen, cfg.max_windows,
                        cfg.batch_size, sequencer.device, evaluate=evaluate,
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
            if streamed is None:
                model.to("cpu")
            if sequencer.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _run_tasks(sequencer, method: str) -> None:
        cfg = sequencer.config.eval
        if getattr(sequencer, "streamed", None) is not None:
            message = ("zero-shot tasks need the whole model on one device and this run streams it (model.streaming); "
                       "run them on the saved model where it fits: omniquant evaluate <output_dir> --eval.tasks [...]")
            log.warning("skipping zero-shot tasks %s: %s", cfg.tasks, message)
            sequencer.results.setdefault("skipped_eval", {})["tasks"] = message
            return
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
            streamed = getattr(sequencer, "streamed", None) is not None  # streamed: RTN block by block
            with contextlib.nullcontext() if streamed else rtn_model(sequencer.model, sequencer.spec,
                                                                     sequencer.config.quant):
                self._evaluate(sequencer, "rtn")

    def on_calibration_end(self, sequencer, results) -> None:
        self._evaluate(sequencer, "omniquant")
