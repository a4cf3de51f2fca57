"""quant.lwc_search (quant/init_search.py): each unit's clipping starts at its least activation-weighted
weight error. The search must pick, per independent unit, the best of its candidates (never worse than
the start), weigh the error by the inputs' E[x²], and in a run start every block there and resume to
the uninterrupted result."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from family_checks import check_cut_and_resume, tiny_run_config

from omniquant_pl import QuantConfig, calibrate
from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.grids import build_quantizer, type_grid
from omniquant_pl.quant.init_search import input_power, search_initial_clipping
from omniquant_pl.quant.lwc import WeightQuantizer

QUANT = QuantConfig(lwc=True)
TYPES = ["Q4_0", "Q5_1", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _weight(rows: int = 6, columns: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    weight[:, 5] *= 10  # an outlier column
    power = torch.rand(columns, generator=generator) ** 3 * 4  # (in,) uneven E[x²]
    return weight, power


def _unit_errors(quantizer, weight: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ((quantizer(weight) - weight).square() * power).reshape(-1, quantizer.search_unit).sum(1)


@pytest.mark.parametrize("type_name", TYPES)
def test_no_unit_ends_worse_than_it_started_and_the_total_drops(type_name):
    weight, power = _weight()
    quantizer = build_quantizer(type_grid(type_name), tuple(weight.shape), QUANT)
    start = _unit_errors(quantizer, weight, power)
    before, after = search_initial_clipping(quantizer, weight, power)
    end = _unit_errors(quantizer, weight, power)
    assert before == pytest.approx(start.sum().item()) and after == pytest.approx(end.sum().item())
    assert (end <= start).all() and end.sum() < 0.97 * start.sum()


@pytest.mark.parametrize("type_name", ["Q6_K", "IQ4_NL"])
def test_one_logit_per_unit_takes_the_best_candidate_or_keeps_its_start(type_name):
    """Grids without minima search one factor: each unit's result is the argmin over the start and
    every candidate, found here by filling the logits one candidate at a time."""
    weight, power = _weight(seed=1)
    quantizer = build_quantizer(type_grid(type_name), tuple(weight.shape), QUANT)
    errors = [_unit_errors(quantizer, weight, power)]
    for logit in quantizer.search_logits():
        with torch.no_grad():
            quantizer.upper_logit.fill_(logit)
        errors.append(_unit_errors(quantizer, weight, power))
    with torch.no_grad():
        quantizer.upper_logit.zero_()
    search_initial_clipping(quantizer, weight, power)
    assert torch.allclose(_unit_errors(quantizer, weight, power), torch.stack(errors).min(0).values)


def test_units_are_searched_independently():
    """A weight searched whole chooses, row by row, what each of its rows chooses alone."""
    weight, power = _weight()
    whole = WeightQuantizer(tuple(weight.shape), 4, 32, gguf_grid=True)
    search_initial_clipping(whole, weight, power)
    for row in range(weight.shape[0]):
        alone = WeightQuantizer((1, weight.shape[1]), 4, 32, gguf_grid=True)
        search_initial_clipping(alone, weight[row:row + 1], power)
        groups = weight.shape[1] // 32
        assert torch.equal(alone.upper_logit, whole.upper_logit[row * groups:(row + 1) * groups])
        assert torch.equal(alone.lower_logit, whole.lower_logit[row * groups:(row + 1) * groups])


def test_the_inputs_power_decides_whether_an_outlier_is_clipped():
    """A unit holding one large weight: when its input channel carries the power the range keeps the
    outlier (it is represented at least as well as with no clipping); when the channel is silent the
    range clips it away to fit the others."""
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)) * 0.02
    weight[:, 3] = 0.5
    unclipped = WeightQuantizer(tuple(weight.shape), 3, 32)
    unclipped.disable_clipping()
    with torch.no_grad():
        unclipped_error = (unclipped(weight) - weight)[:, 3].abs()
    for loud in (True, False):
        power = torch.ones(32)
        power[3] = 1e3 if loud else 0.0
        quantizer = WeightQuantizer(tuple(weight.shape), 3, 32)
        search_initial_clipping(quantizer, weight, power)
        with torch.no_grad():
            outlier_error = (quantizer(weight) - weight)[:, 3].abs()
        if loud:
            assert torch.all(outlier_error <= unclipped_error + 1e-7)
        else:
            assert torch.all(torch.sigmoid(quantizer.upper_logit) < 0.7) and torch.all(outlier_error > 0.15)


def test_input_power_is_the_mean_square_of_every_token_of_every_call():
    linear = torch.nn.Linear(8, 3)
    block = torch.nn.Sequential(linear)
    first, second = torch.randn(2, 5, 8), torch.randn(3, 8)
    with input_power(block, ("0",)) as power:
        block(first)
        block(second)
    tokens = torch.cat([first.reshape(-1, 8), second])
    assert torch.allclose(power["0"], tokens.square().mean(0))
    assert not linear._forward_pre_hooks  # the hook is gone


@pytest.mark.parametrize("fields", [{"lwc_search": True, "lwc": False}, {"lwc_search": True, "let": True}])
def test_lwc_search_needs_lwc_and_no_let(fields):
    with pytest.raises(ConfigError, match="lwc_search"):
        QuantConfig(**fields)


def test_a_run_starts_every_block_at_the_search_and_resumes_to_the_uninterrupted_result(tmp_path, tokenizer):
    """At 3 bits per channel, the searched start has a lower block loss than σ(4) clipping in every
    block, and a run cut after its first block resumes bit for bit."""
    quant = QuantConfig(wbits=3, lwc_search=True)
    searched = calibrate(tiny_run_config(tmp_path, "clean", quant, epochs=1), model=tiny_llama(), tokenizer=tokenizer)
    plain = calibrate(tiny_run_config(tmp_path, "plain", QuantConfig(wbits=3), epochs=1), model=tiny_llama(),
                      tokenizer=tokenizer)
    assert all(s.init_loss < p.init_loss for s, p in zip(searched.blocks, plain.blocks))
    check_cut_and_resume(tmp_path, tokenizer, tiny_llama, quant, searched, stop_at=1, epochs=1)

