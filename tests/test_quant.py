"""Quantizer grids, STE gradients, LWC parameters and QuantLinear fusing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from omniquant_pl.errors import ConfigError
from omniquant_pl.quant import PerTokenActQuantizer, QuantGrid, QuantLinear, WeightQuantizer, round_ste
from omniquant_pl.quant.lwc import clipping_disabled


def _row_minmax_step(rows: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if symmetric:
        return rows.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    return (rows.amax(-1, keepdim=True) - rows.amin(-1, keepdim=True)) / (2**bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_rtn_values_on_grid_within_half_step(bits, symmetric, group_size):
    torch.manual_seed(bits)
    weight = torch.randn(24, 64) * torch.rand(24, 1) * 3
    quantizer = WeightQuantizer((24, 64), bits, group_size, symmetric, learnable_clipping=False)
    deq = quantizer(weight)
    rows = weight.reshape(-1, group_size or 64)
    deq_rows = deq.reshape_as(rows)
    step = _row_minmax_step(rows, bits, symmetric)
    # on the grid: deq = (q - zero_point) * step with integer q and zero point
    levels = deq_rows / step
    assert torch.allclose(levels, levels.round(), atol=2e-3)
    for row in deq_rows:
        assert row.unique().numel() <= 2**bits
    # error at most half a step: the rounded zero point shifts the grid by <= step/2, so even
    # the row's extremes stay within half a step of a level
    err = (deq_rows - rows).abs()
    assert torch.all(err <= step * 0.5 * (1 + 1e-4) + 1e-7)


def test_asymmetric_grid_represents_zero_exactly():
    weight = torch.tensor([[-1.0, -0.3, 0.0, 0.4, 2.0]])
    deq = WeightQuantizer((1, 5), 3, learnable_clipping=False)(weight)
    assert deq[0, 2].item() == 0.0


def test_8bit_is_nearly_lossless_and_2bit_is_not():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)

    def sqnr(bits):
        deq = WeightQuantizer((64, 128), bits, learnable_clipping=False)(weight)
        return 10 * torch.log10(weight.pow(2).sum() / (weight - deq).pow(2).sum())

    assert sqnr(8) > 40 and sqnr(4) > 18 and sqnr(2) < 12


def test_round_ste_gradient_is_identity():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    round_ste(x * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0))


def test_lwc_gradients_reach_gamma_and_beta():
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    quantizer = WeightQuantizer((8, 32), 3, group_size=16)
    assert quantizer.upper_logit.shape == (16, 1) and quantizer.lower_logit.shape == (16, 1)
    assert torch.all(quantizer.upper_logit == 4.0)
    loss = (quantizer(weight) - weight).pow(2).sum()
    loss.backward()
    assert quantizer.upper_logit.grad is not None and quantizer.upper_logit.grad.abs().sum() > 0
    assert quantizer.lower_logit.grad is not None and quantizer.lower_logit.grad.abs().sum() > 0


def test_lwc_clipping_shrinks_range_and_disable_restores_rtn():
    torch.manual_seed(0)
    weight = torch.randn(4, 32)
    quantizer = WeightQuantizer((4, 32), 4)
    with torch.no_grad():
        quantizer.upper_logit.fill_(-1.0)  # σ(-1) ≈ 0.27 of the max
    clipped = quantizer(weight)
    assert torch.all(clipped.amax(-1) < weight.amax(-1) * 0.5)  # σ(-1)·max + at most half a step
    rtn = WeightQuantizer((4, 32), 4, learnable_clipping=False)(weight)
    with clipping_disabled(quantizer):
        assert torch.equal(quantizer(weight), rtn)
    assert quantizer.clipping_enabled


def test_lwc_optimisation_beats_rtn_on_weight_error():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    quantizer = WeightQuantizer((32, 64), 3)
    rtn_err = (WeightQuantizer((32, 64), 3, learnable_clipping=False)(weight) - weight).pow(2).mean()
    opt = torch.optim.AdamW(quantizer.parameters(), lr=1e-2, weight_decay=0)
    for _ in range(200):
        opt.zero_grad()
        loss = (quantizer(weight) - weight).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * rtn_err.item()


@pytest.mark.parametrize("bad_bits", [1, 9, 0, 3.5])
def test_bad_bits_rejected(bad_bits):
    with pytest.raises(ConfigError, match="bits"):
        QuantGrid(bad_bits)


def test_group_size_must_divide_in_features():
    with pytest.raises(ConfigError, match="does not divide in_features 48"):
        WeightQuantizer((8, 48), 4, group_size=32)


def test_per_token_activation_quantizer():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * torch.rand(2, 5, 1) * 10
    q = PerTokenActQuantizer(4)
    out = q(x)
    assert out.shape == x.shape
    rng = x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)
    step = rng / 15
    assert torch.all((out - x).abs() <= step + 1e-5)
    for token in out.reshape(-1, 16):
        assert token.unique().numel() <= 16
    x.requires_grad_(True)
    q(x).sum().backward()
    # STE: identity gradient, except at each token's min/max which also move the scale
    extreme = (x == x.amax(-1, keepdim=True)) | (x == x.amin(-1, keepdim=True))
    assert torch.all(x.grad[~extreme] == 1.0)
    assert torch.isfinite(x.grad).all()


def test_quant_linear_fuses_to_identical_linear():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=True)
    quantizer = WeightQuantizer((16, 32), 3, group_size=8)
    with torch.no_grad():
        quantizer.upper_logit.uniform_(-1, 4)
        quantizer.lower_logit.uniform_(-1, 4)
    qlinear = QuantLinear(linear, quantizer)
    x = torch.randn(3, 7, 32)
    fused = qlinear.to_linear()
    assert type(fused) is nn.Linear
    torch.testing.assert_close(fused(x), qlinear(x), rtol=0, atol=0)
    assert not torch.equal(fused.weight, linear.weight)


def test_fused_quantizers_match_eager_values_and_gradients():
    """The torch.compile'd quantizer kernel (train.compile: quantizers) computes the same math."""
    from omniquant_pl.compile_policy import CompilePolicy, active_policy

    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.rand(48, 1) * 2
    quantizer = WeightQuantizer((48, 64), bits=3, group_size=16)
    with torch.no_grad():
        quantizer.upper_logit.uniform_(0.0, 4.0)
        quantizer.lower_logit.uniform_(0.0, 4.0)
    acts = PerTokenActQuantizer(4)
    x = torch.randn(2, 8, 64, requires_grad=True)

    def run():
        quantizer.zero_grad()
        x.grad = None
        w_q = quantizer(weight)
        y = acts(x) * 1.5
        (w_q.square().sum() + (y * torch.linspace(-1, 1, 64)).sum()).backward()
        return w_q.detach(), y.detach(), quantizer.upper_logit.grad.clone(), quantizer.lower_logit.grad.clone(), x.grad.clone()

    eager = run()
    policy = CompilePolicy("quantizers")
    with active_policy(policy):
        fused = run()
    assert policy.failed == {}
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eager[2].abs().sum() > 0  # the clipping logits do get gradients


def test_a_compile_failure_turns_compiling_off_for_that_run_only(monkeypatch, caplog):
    """The fallback is held by the run's CompilePolicy: its run goes on eagerly (one warning), and a
    later run in the same process compiles again."""
    from omniquant_pl import compile_policy
    from omniquant_pl.compile_policy import CompilePolicy, active_policy
    from omniquant_pl.quant import fake_quant

    calls = []

    def broken(fn, **options):
        def fail(*args):
            calls.append("compiled")
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(fake_quant, "compiled", broken)
    quantizer = WeightQuantizer((8, 16), bits=3)
    weight = torch.randn(8, 16)
    expected = quantizer(weight)
    first, second = CompilePolicy("quantizers"), CompilePolicy("quantizers")
    with active_policy(first):
        torch.testing.assert_close(quantizer(weight), expected, rtol=0, atol=0)  # eager after the failure
        quantizer(weight)
    assert calls == ["compiled"] and "fused quantizers failed (RuntimeError: no compiler here)" in caplog.text
    assert not first.allows("quantizers") and second.allows("quantizers")
    with active_policy(second):
        quantizer(weight)
    assert calls == ["compiled", "compiled"]  # the next run tried again
    assert compile_policy.current_policy() is None  # nothing left active outside a run
