"""Checks the architecture-family tests (test_phi3, test_falcon, test_gemma3, test_moe) share: a
callback that stops calibration at a block, the calibrate -> cut -> resume comparison, and the
W4A4 hook-reach check on a BlockModule. Plain helpers, imported as `from family_checks import ...`."""
from __future__ import annotations

import pytest
import torch

from omniquant_pl import CalibConfig, CalibrationCallback, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from omniquant_pl.quant.act import PerTokenActQuantizer


def capture_block(model, index: int = 0, seqlen: int = 24, lowest_id: int = 0):
    """(block `index`, the model's spec, its captured inputs) on two random windows (seed 1)."""
    from conftest import TINY_VOCAB

    from omniquant_pl.arch import get_arch
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.calib.capture import capture_block_inputs

    spec = get_arch(model)
    windows = torch.randint(lowest_id, TINY_VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(1))
    return get_blocks(model, spec)[index], spec, capture_block_inputs(model, spec, windows)


def block_output(block, params, captured, kwargs=None):
    """The block's hidden states with `params` in place of its own (block 0's kwargs by default)."""
    from torch.func import functional_call

    out = functional_call(block, params, (captured.hidden_states,), captured.block_kwargs if kwargs is None else kwargs)
    return out[0] if isinstance(out, tuple) else out


def fuse_with_random_parameters(module, captured):
    """Random LET (seed 5) and LWC logits in [0, 5]; returns (fake-quant output, fused block, its output)."""
    from test_let import _random_let

    from omniquant_pl.calib.capture import run_block

    _random_let(module.let, seed=5)
    with torch.no_grad():
        for p in module.lwc_parameters():
            p.uniform_(0, 5)
        fake_quant = module(captured.hidden_states)
        fused = module.fuse()
        return fake_quant, fused, run_block(fused, captured.hidden_states, captured.block_kwargs)


class StopAtBlock(CalibrationCallback):
    """Interrupt the run (KeyboardInterrupt) as block `block` starts: a cut to resume from."""

    def __init__(self, block: int) -> None:
        self.block = block

    def on_block_start(self, sequencer, index, module):
        if index == self.block:
            raise KeyboardInterrupt


def tiny_run_config(tmp_path, name: str, quant: QuantConfig, resume: bool = False, **train) -> RunConfig:
    """An in-memory model calibrated on pydoc (4 x 32 tokens, 1 epoch, batch 2), evaluated on one
    32-token pydoc window, written under tmp_path/name without the model."""
    return RunConfig(model=ModelConfig("in-memory"), quant=quant,
                     calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
                     train=TrainConfig(**{"epochs": 1, "batch_size": 2, **train}),
                     eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                     output_dir=str(tmp_path / name), save_model=False, resume=resume)


def check_cut_and_resume(tmp_path, tokenizer, build, quant: QuantConfig, clean: dict, stop_at: int, **train):
    """After the "clean" run: the same run cut as block `stop_at` starts, then resumed, ends with
    the clean run's per-block final losses and bit-identical learned parameters."""
    from safetensors.torch import load_file

    from omniquant_pl import calibrate

    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_run_config(tmp_path, "cut", quant, **train), callbacks=[StopAtBlock(stop_at)], model=build(),
                  tokenizer=tokenizer)
    resumed = calibrate(tiny_run_config(tmp_path, "cut", quant, resume=True, **train), model=build(),
                        tokenizer=tokenizer)
    assert resumed.resumed_at_block == stop_at
    assert [b.final_loss for b in resumed.blocks] == [b.final_loss for b in clean.blocks]
    learned = load_file(tmp_path / "clean" / "learned_params.safetensors")
    again = load_file(tmp_path / "cut" / "learned_params.safetensors")
    assert again.keys() == learned.keys() and all(torch.equal(again[k], learned[k]) for k in learned)
    return learned


def check_calibrates_and_resumes(tmp_path, tokenizer, build, blocks: int, stop_at: int):
    """W4A4+LET (group 16) end to end on `build()`: every block finishes with a finite loss, the
    perplexity is finite, and a run cut at block `stop_at` resumes to the same result. Returns
    the clean run's learned parameters for the family's own checks."""
    from omniquant_pl import calibrate

    quant = QuantConfig(wbits=4, abits=4, let=True, group_size=16)
    clean = calibrate(tiny_run_config(tmp_path, "clean", quant), model=build(), tokenizer=tokenizer)
    assert [b.block for b in clean.blocks] == list(range(blocks))
    assert all(torch.isfinite(torch.tensor(b.final_loss)) for b in clean.blocks)
    assert torch.isfinite(torch.tensor(clean.perplexity["omniquant"]["pydoc"].ppl))
    return check_cut_and_resume(tmp_path, tokenizer, build, quant, clean, stop_at)


def check_w4a4_hooks(module, hidden_states, monkeypatch, attention_shapes):
    """One forward of a W4A4 BlockModule: the attention quantizes q, k and v once (their
    (B, heads, T, head_dim) shapes are `attention_shapes`, any order), and every nn.Linear of the
    block (module.quant_linears) multiplies a per-token 4-bit input (<= 16 levels per token)."""
    attention_inputs = []
    forward = PerTokenActQuantizer.forward

    def recording_forward(self, x):
        if x.ndim == 4:  # (B, heads, T, head_dim)
            attention_inputs.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(PerTokenActQuantizer, "forward", recording_forward)
    linear_inputs = {}
    linears = list(module.quant_linears)

    def record_input(name):
        def hook(linear, args, output):  # after the pre-hooks: the input the linear multiplied
            linear_inputs[name] = args[0].detach()

        return hook

    for name in linears:
        module.block.get_submodule(name).register_forward_hook(record_input(name))
    with torch.no_grad():
        module(hidden_states)
    assert module.act_quantizers.qkv_calls == 1
    assert sorted(attention_inputs) == sorted(attention_shapes)
    assert linear_inputs.keys() == set(linears)
    for name, x in linear_inputs.items():
        levels = max(len(torch.unique(token)) for token in x.reshape(-1, x.shape[-1]))
        assert levels <= 16 and x.shape[-1] > 16, (name, levels)
