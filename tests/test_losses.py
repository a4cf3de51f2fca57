"""Block losses (train.loss): what each measures, and that training uses the configured one."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_BUILDERS

from omniquant_pl import QuantConfig, TrainConfig
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.block_step import block_loss
from omniquant_pl.calib.capture import capture_block_inputs
from omniquant_pl.errors import ConfigError
from omniquant_pl.losses import LOSSES, mse, relative_mse


def _pair(seed=0, tokens=6, hidden=8):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(2, tokens, hidden, generator=gen)
    output = target + 0.1 * torch.randn(2, tokens, hidden, generator=gen)
    return output, target


def test_relative_mse_ignores_a_tokens_size_where_mse_grows_with_its_square():
    output, target = _pair()
    big_output, big_target = output.clone(), target.clone()
    big_output[0, 0] *= 1000  # one massive-activation token: its error grows with it
    big_target[0, 0] *= 1000
    torch.testing.assert_close(relative_mse(big_output, big_target), relative_mse(output, target))
    assert mse(big_output, big_target) > 1e4 * mse(output, target)


def test_relative_mse_is_mse_over_the_mean_square_when_every_token_has_the_same_size():
    output, target = _pair(seed=1)
    target = target / target.pow(2).mean(-1, keepdim=True).sqrt() * 3.0  # every token: mean square 9
    torch.testing.assert_close(relative_mse(output, target), mse(output, target) / 9.0)


def test_relative_mse_of_an_all_zero_target_token_is_finite():
    output, target = _pair(seed=2)
    target[1, 3] = 0.0
    assert torch.isfinite(relative_mse(output, target))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_block_training_uses_the_configured_loss(loss):
    model = TINY_BUILDERS["llama"]()
    spec = get_arch(model)
    windows = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, spec, windows)
    block = get_blocks(model, spec)[0]
    with torch.no_grad():
        target = block(captured.hidden_states, **captured.block_kwargs)
        target = target[0] if isinstance(target, tuple) else target
    module = BlockModule(block, 0, spec, captured.block_kwargs, QuantConfig(wbits=3, let=True),
                         TrainConfig(loss=loss))
    with torch.no_grad():
        output = module(captured.hidden_states)
        expected = LOSSES[loss](output, target)
        got = module.loss((captured.hidden_states, target))
        with_aug = block_loss(module, captured.hidden_states, target, target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(with_aug, 2 * expected)
    others = [LOSSES[name](output, target) for name in LOSSES if name != loss]
    assert all(not torch.equal(other, expected) for other in others)


def test_an_unknown_loss_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="train.loss must be one of mse, relative_mse"):
        TrainConfig(loss="l1")


def test_the_config_offers_exactly_the_registered_losses():
    import typing

    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["loss"])) == set(LOSSES)
