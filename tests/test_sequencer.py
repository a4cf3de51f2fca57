"""Block capture, block training, fusing and the saved model, on tiny random Llama (GQA) and OPT."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BUILDERS

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import capture_block_inputs, run_block

FAMILIES = sorted(TINY_BUILDERS)


def _windows(n=3, seqlen=32, vocab=384, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_and_block_chain_match_the_model(family):
    model = TINY_BUILDERS[family](layers=3)
    spec = get_arch(model)
    windows = _windows()
    captured = capture_block_inputs(model, spec, windows)
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True).hidden_states
        hidden = captured.hidden_states
        torch.testing.assert_close(hidden, reference[0])
        for i, block in enumerate(get_blocks(model, spec)[:2]):
            hidden = run_block(block, hidden, captured.block_kwargs)
            torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-5, atol=1e-5)


def _heavy_tailed_(model):
    """Give linears outlier-heavy weights so that clipping matters, as in real LLMs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name and "lm_head" not in name:
                param.copy_(torch.distributions.StudentT(2.5).sample(param.shape) * 0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_block_equals_fake_quant_block(family):
    model = TINY_BUILDERS[family]()
    spec = get_arch(model)
    captured = capture_block_inputs(model, spec, _windows())
    block = get_blocks(model, spec)[0]
    module = BlockModule(block, 0, spec, captured.block_kwargs, QuantConfig(wbits=3, group_size=16), TrainConfig())
    with torch.no_grad():
        for p in module.lwc_parameters():
            p.uniform_(-2, 5)
        fake_quant = module(captured.hidden_states)
        fused = module.fuse()
        fused_out = run_block(fused, captured.hidden_states, captured.block_kwargs)
    assert not any("Quant" in type(m).__name__ for m in fused.modules())
    torch.testing.assert_close(fused_out, fake_quant, rtol=0, atol=0)


def _activation_outliers_(model):
    """A few norm channels 20x larger than the rest: the outlier channels LET exists for."""
    spec = get_arch(model)
    with torch.no_grad():
        for block in get_blocks(model, spec):
            for norm in (spec.qkv.norm, spec.fc1.norm):
                block.get_submodule(norm).weight[:4] *= 20


def _run(tmp_path, tokenizer, family, name, layers=2, outliers=False, **overrides):
    model = TINY_BUILDERS[family](layers=layers)
    _heavy_tailed_(model)
    if outliers:
        _activation_outliers_(model)
    cfg = RunConfig(
        model=ModelConfig("in-memory"),
        quant=overrides.pop("quant", QuantConfig(wbits=3)),
        calib=CalibConfig(source="pydoc", nsamples=8, seqlen=64),
        train=overrides.pop("train", TrainConfig(epochs=15, batch_size=2, lwc_lr=2e-2)),
        eval=EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=4),
        output_dir=str(tmp_path / name),
        **overrides,
    )
    return calibrate(cfg, model=model, tokenizer=tokenizer), cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_lwc_training_lowers_block_loss_well_below_rtn(tmp_path, tokenizer, family):
    """Paper init (σ(4)), one block fed exact inputs: training alone must beat RTN clearly."""
    results, _ = _run(tmp_path, tokenizer, family, "lwc", layers=1, save_model=False,
                      train=TrainConfig(epochs=30, batch_size=2, lwc_lr=2e-2, keep_best=False))
    (block,) = results.blocks
    assert block.final_loss < 0.85 * block.rtn_loss, block
    assert block.final_loss < 0.85 * block.init_loss, block


@pytest.mark.parametrize("with_rtn", [False, True])
def test_keep_best_never_ends_above_the_initial_loss(tmp_path, tokenizer, with_rtn):
    """A learning rate far too high makes training worse; keep_best restores the start (or, with
    keep_best_rtn, RTN when that is lower still)."""
    results, _ = _run(tmp_path, tokenizer, "llama", "keep", save_model=False,
                      train=TrainConfig(epochs=4, batch_size=2, lwc_lr=3.0, keep_best_rtn=with_rtn))
    for block in results.blocks:
        floor = min(block.init_loss, block.rtn_loss) if with_rtn else block.init_loss
        assert block.final_loss <= floor, block
        assert with_rtn or block.restored != "rtn", block
    restored = [b for b in results.blocks if b.restored]
    assert restored and all(b.trained_loss > b.final_loss for b in restored)


@pytest.mark.parametrize("let", [False, True])
def test_keep_best_falls_back_to_rtn_exactly_when_rtn_is_best(tmp_path, tokenizer, let):
    """keep_best_rtn on (auto with LET). Heavy initial clipping (σ(-3) ≈ 0.05) and no training:
    RTN has the lowest loss, and the block then computes RTN exactly (σ = 1.0, identity LET), down
    to the stored codes."""
    from omniquant_pl.quant.codes import load_block_codes
    from omniquant_pl.quant.rtn import rtn_quantizer

    quant = QuantConfig(wbits=4, group_size=16, lwc_init=-3.0, let=let, abits=8 if let else 16)
    # keep_best_rtn true; "auto" (the default) turns it on where LET is learned
    results, _ = _run(tmp_path, tokenizer, "llama", "rtn", quant=quant,
                      train=TrainConfig(epochs=0, keep_best_rtn="auto" if let else True))
    assert all(b.restored == "rtn" and b.final_loss == b.rtn_loss for b in results.blocks)
    rerun_model = TINY_BUILDERS["llama"](layers=2)
    _heavy_tailed_(rerun_model)
    block0 = get_blocks(rerun_model, get_arch(rerun_model))[0]
    for name, codes in load_block_codes(tmp_path / "rtn", 0).items():
        weight = block0.get_submodule(name).weight
        assert torch.equal(codes.dequantize(), rtn_quantizer(weight, quant)(weight)), name


@pytest.mark.parametrize("let,keep_best_rtn", [(False, False), (True, False), (False, "auto")])
def test_keep_best_without_rtn_never_picks_rtn(tmp_path, tokenizer, let, keep_best_rtn):
    """train.keep_best_rtn false (or auto without LET): the same heavy clipping, RTN still the lowest
    loss, yet the block keeps its own (initial) parameters."""
    quant = QuantConfig(wbits=4, group_size=16, lwc_init=-3.0, let=let, abits=8 if let else 16)
    results, _ = _run(tmp_path, tokenizer, "llama", "nortn", layers=1, quant=quant, save_model=False,
                      train=TrainConfig(epochs=0, keep_best_rtn=keep_best_rtn))
    for block in results.blocks:
        assert block.rtn_loss < block.init_loss and block.restored is None, block
        assert block.final_loss == block.init_loss, block


@pytest.mark.parametrize("family", FAMILIES)
def test_results_and_saved_model_reproduce_perplexity(tmp_path, tokenizer, family):
    from transformers import AutoModelForCausalLM

    from omniquant_pl.eval.perplexity import perplexity_on_source

    results, cfg = _run(tmp_path, tokenizer, family, "save", quant=QuantConfig(wbits=4, group_size=32),
                        train=TrainConfig(epochs=2, batch_size=4))
    out = tmp_path / "save"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["quant_tag"] == "W4A16g32"
    assert set(on_disk["perplexity"]) == {"fp", "rtn", "omniquant"}
    assert "pydoc" in on_disk["calibration_source"]
    assert len(on_disk["blocks"]) == 2 and on_disk["total_seconds"] > 0
    assert (out / "learned_params.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.omniquant["wbits"] == 4
    ppl = perplexity_on_source(reloaded, tokenizer, "pydoc", 64, 4)["ppl"]
    assert ppl == pytest.approx(results.perplexity["omniquant"]["pydoc"].ppl, rel=1e-6)
    # the saved weights are on the 4-bit grid: at most 16 distinct values per group of 32
    weight = get_blocks(reloaded, get_arch(reloaded))[0].get_submodule(get_arch(reloaded).fc2[0]).weight
    groups = weight.reshape(-1, 32)
    assert max(g.unique().numel() for g in groups) <= 16


def test_same_seed_gives_identical_learned_parameters(tmp_path, tokenizer):
    from safetensors.torch import load_file

    train = TrainConfig(epochs=3, batch_size=2, shuffle=True)
    _run(tmp_path, tokenizer, "llama", "a", train=train, save_model=False)
    _run(tmp_path, tokenizer, "llama", "b", train=train, save_model=False)
    a = load_file(tmp_path / "a" / "learned_params.safetensors")
    b = load_file(tmp_path / "b" / "learned_params.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # another shuffle_seed: the same windows in another order, so other parameters
    _run(tmp_path, tokenizer, "llama", "c", train=TrainConfig(epochs=3, batch_size=2, shuffle=True, shuffle_seed=9),
         save_model=False)
    c = load_file(tmp_path / "c" / "learned_params.safetensors")
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_calibration_callbacks_see_every_block_and_epoch(tmp_path, tokenizer):
    from omniquant_pl import CalibrationCallback

    class Recorder(CalibrationCallback):
        def __init__(self):
            self.events = []

        def on_calibration_start(self, sequencer):
            self.events.append("start")

        def on_block_start(self, sequencer, index, module):
            self.events.append(("block_start", index))

        def on_train_epoch_end(self, trainer, pl_module):  # a plain Lightning hook
            self.events.append(("epoch", pl_module.index, trainer.current_epoch))

        def on_block_end(self, sequencer, index, metrics):
            assert metrics.block == index and metrics.final_loss is not None
            self.events.append(("block_end", index))

        def on_calibration_end(self, sequencer, results):
            self.events.append("end")

    recorder = Recorder()
    train = TrainConfig(epochs=2, batch_size=4)
    model = TINY_BUILDERS["llama"]()
    cfg = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4),
                    calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=train,
                    eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                    output_dir=str(tmp_path / "cb"), save_model=False)
    calibrate(cfg, callbacks=[recorder], model=model, tokenizer=tokenizer)
    assert recorder.events == [
        "start",
        ("block_start", 0), ("epoch", 0, 0), ("epoch", 0, 1), ("block_end", 0),
        ("block_start", 1), ("epoch", 1, 0), ("epoch", 1, 1), ("block_end", 1),
        "end",
    ]


def test_progress_without_terminal_has_no_control_codes(tmp_path, tokenizer):
    import io

    from rich.console import Console

    from callbacks.progress import ProgressCallback

    buffer = io.StringIO()
    progress = ProgressCallback(console=Console(file=buffer, force_terminal=False, width=200))
    model = TINY_BUILDERS["opt"]()
    cfg = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4),
                    calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=1),
                    eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                    output_dir=str(tmp_path / "p"), save_model=False)
    calibrate(cfg, callbacks=[progress], model=model, tokenizer=tokenizer)
    text = buffer.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.count("block ") == 2 and "block 1 (2 of 2): rtn" in text  # numbered from 0, as everywhere


def test_log_records_print_above_the_live_progress_bar_not_onto_it(tmp_path, tokenizer):
    """On a terminal, a warning logged mid-run goes through the bar's console on its own line."""
    import io
    import logging
    import sys

    from rich.console import Console

    from callbacks.progress import ProgressCallback

    buffer = io.StringIO()
    progress = ProgressCallback(console=Console(file=buffer, force_terminal=True, width=120))
    root = logging.getLogger()
    plain = logging.StreamHandler(sys.stderr)
    root.addHandler(plain)
    before = [type(h).__name__ for h in root.handlers]
    seen = []

    class WarnMidRun(ProgressCallback.__mro__[1]):  # a CalibrationCallback
        def on_block_start(self, sequencer, index, module):
            seen.append([type(h).__name__ for h in root.handlers])
            logging.getLogger("omniquant_pl.test").warning("a warning in block %d", index)

    try:
        model = TINY_BUILDERS["opt"](layers=1)
        cfg = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4),
                        calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=TrainConfig(epochs=1),
                        eval=EvalConfig(datasets=[], baselines=[]), output_dir=str(tmp_path / "p"), save_model=False)
        calibrate(cfg, callbacks=[progress, WarnMidRun()], model=model, tokenizer=tokenizer)
        after = [type(h).__name__ for h in root.handlers]
    finally:
        root.removeHandler(plain)
    assert "RichHandler" in seen[0] and plain not in seen[0]
    assert after == before  # put back when the bar stops
    import re

    assert "a warning in block 0" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())


def test_summary_timing_says_what_spans_sessions_after_a_resume():
    from omniquant_pl.report import timing_line
    from omniquant_pl.results import RunResults

    def results(**values):
        return RunResults(config={}, quant_tag="W3A16", model_type="llama", **values)

    fresh = timing_line(results(calibration_seconds=10.0, total_seconds=12.5))
    assert fresh.startswith("calibration: 10.0 s; total") and "12.5 s" in fresh
    resumed = timing_line(results(calibration_seconds=107.7, session_seconds=30.1, total_seconds=40.7,
                                  resumed_at_block=8))
    assert "107.7 s over all sessions" in resumed and "resumed at block 8" in resumed
    assert "30.1 s" in resumed and "this session's total: 40.7 s" in resumed


def test_learned_state_is_a_snapshot_and_loads_back():
    from omniquant_pl.config import QuantConfig as Q

    model = TINY_BUILDERS["opt"](layers=1)
    spec = get_arch(model)
    captured = capture_block_inputs(model, spec, _windows())
    module = BlockModule(get_blocks(model, spec)[0], 0, spec, captured.block_kwargs, Q(wbits=3, abits=8, let=True), TrainConfig())
    snapshot = module.learned_state()
    assert any(k.startswith("let.") for k in snapshot) and any(k.endswith(".lwc.upper") for k in snapshot)
    with torch.no_grad():
        for p in module.lwc_parameters() + module.let_parameters():
            p.add_(1.0)
    assert all(not torch.equal(snapshot[k], v) for k, v in module.learned_state().items())
    module.load_learned_state(snapshot)
    for key, value in module.learned_state().items():
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0)


@pytest.mark.parametrize("abits", [16, 6])
def test_an_exception_mid_block_gives_the_callers_block_back_unconverted(tmp_path, tokenizer, abits):
    """A failure while block 1 trains (a callback's error here; Ctrl-C alike) leaves block 1 with its
    original nn.Linear modules and weights, no activation hooks, on the CPU; block 0 stays fused."""
    import copy

    from lightning.pytorch.callbacks import Callback

    from omniquant_pl.quant.linear import QuantLinear

    class FailInBlock1(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.index == 1:
                raise RuntimeError("stop here")

    model = TINY_BUILDERS["llama"](layers=2)
    original = copy.deepcopy(model.model.layers[1].state_dict())
    cfg = RunConfig(
        model=ModelConfig("in-memory"), quant=QuantConfig(wbits=3, abits=abits, let=abits < 16),
        calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
        train=TrainConfig(epochs=1, batch_size=2), eval=EvalConfig(datasets=[], baselines=[]),
        output_dir=str(tmp_path / "out"), save_model=False,
    )
    with pytest.raises(RuntimeError, match="stop here"):
        calibrate(cfg, callbacks=[FailInBlock1()], model=model, tokenizer=tokenizer)
    block = model.model.layers[1]
    assert not any(isinstance(m, QuantLinear) for m in block.modules())
    assert all(type(block.get_submodule(name)) is torch.nn.Linear for name in ("self_attn.q_proj", "mlp.down_proj"))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in block.modules())
    state = block.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert {p.device.type for p in block.parameters()} == {"cpu"}
    # block 0 finished: fused (quantized weights, plain linears)
    assert not any(isinstance(m, QuantLinear) for m in model.model.layers[0].modules())
