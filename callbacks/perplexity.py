"""Perplexity (and zero-shot tasks, when configured) of the FP / RTN baselines before calibration
and of the quantized model after, through the one evaluation path (eval/evaluate.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from omniquant_pl.callback import CalibrationCallback, CalibrationRun
from omniquant_pl.eval.evaluate import evaluate_into
from omniquant_pl.quant.rtn import rtn_model
from omniquant_pl.streaming.evaluate import streamed_evaluator

ProgressFactory = Callable[[str], Callable[[int, int], None]]


class PerplexityCallback(CalibrationCallback):
    """Evaluates `run.config.eval` on the whole model (moved to the accelerator for it) into
    ``run.results.evaluation`` under fp / rtn / omniquant. A dataset or task set that cannot be
    loaded is a recorded, visible skip (evaluate_into's policy): calibration work is never lost to an
    evaluation problem. A streamed model is evaluated block by block (the same perplexity), without
    zero-shot tasks. `progress`: a progress bar per dataset (callbacks.with_defaults wires the
    ProgressCallback's)."""

    rank_zero_only = True  # data-parallel runs: rank 0 evaluates, the others wait

    def __init__(self, progress: ProgressFactory | None = None) -> None:
        self.progress = progress

    def _evaluate(self, run: CalibrationRun, method: str) -> None:
        evaluate = None  # the whole model on the device
        if run.streamed is None:
            run.model.to(run.device)
        else:  # each block as the run has it now (finished ones fused); RTN quantizes each as it loads
            evaluate = streamed_evaluator(run.model, run.spec, run.streamed,
                                          run.config.quant if method == "rtn" else None)
        try:
            evaluate_into(run.results.evaluation, method, run.model, run.tokenizer, run.config.eval, run.device,
                          evaluate=evaluate, progress=self.progress)
        finally:
            if run.streamed is None:
                run.model.to("cpu")
            if run.device.type == "cuda":
                torch.cuda.empty_cache()

    def on_calibration_start(self, run: CalibrationRun) -> None:
        # a resumed run keeps the baselines measured before it was interrupted
        baselines = [b for b in run.config.eval.baselines if b not in run.results.perplexity]
        if "fp" in baselines:
            self._evaluate(run, "fp")
        if "rtn" in baselines:  # streamed: RTN block by block, as each block loads
            with contextlib.nullcontext() if run.streamed is not None else rtn_model(run.model, run.spec,
                                                                                     run.config.quant):
                self._evaluate(run, "rtn")

    def on_calibration_end(self, run: CalibrationRun, results) -> None:
        self._evaluate(run, "omniquant")
