"""The run plan: every `auto` resolved once, printed at the start and saved in results.json."""
from __future__ import annotations

import logging

import pytest
import torch

from omniquant_pl.config import CalibConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from omniquant_pl.distributed import Processes
from omniquant_pl.plan import plan_run, resolve_cache_device, resolve_keep_best_rtn, resolve_precision


def _config(**train) -> RunConfig:
    return RunConfig(model=ModelConfig("x"), quant=QuantConfig(wbits=4, abits=4, let=True),
                     calib=CalibConfig(nsamples=8, seqlen=16), train=TrainConfig(**train))


def test_a_cpu_plan_resolves_every_auto(caplog):
    with caplog.at_level(logging.INFO):
        plan = plan_run(_config(cuda_graph=True, batch_size=2), Processes(), torch.bfloat16, hidden_size=64,
                        streaming=False)
    assert (plan.device, plan.precision, plan.compile, plan.cuda_graph) == ("cpu", "32-true", "off", False)
    assert (plan.model_dtype, plan.block_dtype, plan.cache_dtype, plan.cache_device) == (
        "bfloat16", "float32", "float32", "cpu")
    assert plan.keep_best_rtn is True and plan.shuffle_seed == 2 and plan.local_batch_size == 2
    assert len(plan.notes) == 1 and "train.cuda_graph needs one CUDA process" in plan.notes[0]
    assert plan.summary() in caplog.text and plan.notes[0] in caplog.text
    assert type(plan).from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("choice, let, expected", [("auto", True, True), ("auto", False, False), (True, False, True),
                                                   (False, True, False)])
def test_keep_best_rtn(choice, let, expected):
    assert resolve_keep_best_rtn(choice, let) is expected


def test_gpu_choices_resolve_from_the_model_and_the_free_memory():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, torch.float16) == "16-mixed"
    assert resolve_precision("auto", cuda, torch.bfloat16) == "bf16-mixed"
    gib = 2**30
    assert resolve_cache_device("auto", cuda, cache_bytes=gib, aug_loss=False, free_bytes=8 * gib) == cuda
    assert resolve_cache_device("auto", cuda, cache_bytes=gib, aug_loss=True, free_bytes=9 * gib).type == "cpu"
    assert resolve_cache_device("cpu", cuda, cache_bytes=1, aug_loss=False, free_bytes=8 * gib).type == "cpu"
