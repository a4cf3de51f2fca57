"""benchmarks/speed.py on a tiny block (CPU): both paths run the real calibration and agree."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from omniquant_pl import TrainConfig
from omniquant_pl.checkpoint import config_hash
from omniquant_pl.config import ModelConfig, RunConfig
from omniquant_pl.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed


def test_speed_benchmark_compiled_block_step_matches_reference(tmp_path):
    output = tmp_path / "speed.json"
    report = speed.main(["--shape", "tiny", "--nsamples", "4", "--seqlen", "32", "--epochs", "2", "--compare",
                         "--compile", "block", "--work-dir", str(tmp_path / "work"), "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    reference, compiled = report["rows"]
    assert reference["compile"] == "off" and not reference["compiled_step"]
    assert compiled["compiled_step"], "the block step did not compile (fell back to eager)"
    assert reference["steps_per_epoch"] == compiled["steps_per_epoch"] == 4
    assert compiled["final_epoch_loss"] == pytest.approx(reference["final_epoch_loss"], rel=1e-4)
    assert compiled["speedup_vs_reference"] > 0 and compiled["tflops"] > 0


def test_speed_settings_are_validated_and_do_not_change_the_checkpoint_identity():
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="fast")
    with pytest.raises(ConfigError, match="cache_device"):
        TrainConfig(cache_device="gpu0")
    with pytest.raises(ConfigError, match="steps_per_call"):
        TrainConfig(steps_per_call=0)
    assert TrainConfig(batch_size=4, lr_batch_scaling="sqrt").lr_multiplier == 2.0
    assert TrainConfig(batch_size=4, lr_batch_scaling="linear").lr_multiplier == 4.0
    assert TrainConfig(batch_size=4).lr_multiplier == 1.0
    base = RunConfig(model=ModelConfig("m"))
    faster = RunConfig(model=ModelConfig("m"), train=TrainConfig(compile="block", cache_device="cpu",
                                                                          steps_per_call=1))
    assert config_hash(base) == config_hash(faster)  # a resumed run may switch speed settings
    assert config_hash(base) != config_hash(RunConfig(model=ModelConfig("m"), train=TrainConfig(batch_size=2)))


def _tiny_block_module(quant, train, samples=6):
    from conftest import tiny_llama

    from omniquant_pl.arch.registry import get_arch, get_blocks
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.calib.capture import capture_block_inputs, run_block

    model = tiny_llama()
    spec = get_arch(model)
    windows = torch.randint(0, 300, (samples, 16), generator=torch.Generator().manual_seed(3))
    captured = capture_block_inputs(model, spec, windows)
    block = get_blocks(model, spec)[0]
    with torch.no_grad():
        targets = run_block(block, captured.hidden_states, captured.block_kwargs)
    module = BlockModule(block, 0, spec, captured.block_kwargs, quant, train)
    return module, captured.hidden_states, targets


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_lightning_chunked_steps_train_exactly_like_a_plain_pytorch_loop(steps_per_call, tmp_path):
    """The Lightning path (manual optimization, `steps_per_call` AdamW steps per training_step,
    shuffled batches) must give the parameters of a hand-written loop over the same batch order."""
    import lightning as L

    from omniquant_pl.calib.batches import cached_batch_loader
    from omniquant_pl.config import QuantConfig

    quant = QuantConfig(wbits=3, let=True)
    train = TrainConfig(epochs=3, batch_size=2, shuffle=True, steps_per_call=steps_per_call)
    lit, inputs, targets = _tiny_block_module(quant, train)
    loader = cached_batch_loader(inputs, targets, batch_size=2, shuffle=True, seed=7, steps_per_call=steps_per_call)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(lit, train_dataloaders=loader)

    plain, _, _ = _tiny_block_module(quant, train)
    losses = _plain_loop_epoch_losses(plain, inputs, targets, batch_size=2, seed=7, epochs=3)

    assert trainer.global_step == 3 * 3  # optimizer steps, not Lightning batches
    assert lit.epoch_steps == 3
    assert lit.epoch_losses == pytest.approx(losses, rel=1e-6)
    learned, expected = lit.learned_state(), plain.learned_state()
    assert learned.keys() == expected.keys() and any("let." in k for k in learned)
    for key in expected:
        torch.testing.assert_close(learned[key], expected[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(expected["self_attn.q_proj.lwc.upper"], _tiny_block_module(quant, train)[0]
                           .learned_state()["self_attn.q_proj.lwc.upper"])  # it did train


def _plain_loop_epoch_losses(module, inputs, targets, batch_size, seed, epochs):
    """A hand-written AdamW loop over the same shuffled batches as the Lightning path."""
    from omniquant_pl.calib.batches import cached_batch_loader

    optimizer = module.configure_optimizers()
    batches = cached_batch_loader(inputs, targets, batch_size=batch_size, shuffle=True, seed=seed)
    losses = []
    for epoch_index in range(epochs):
        batches.sampler.set_epoch(epoch_index)  # as Lightning does
        epoch = []
        for batch in batches:
            optimizer.zero_grad()
            loss = module.loss(batch)
            loss.backward()
            optimizer.step()
            epoch.append(loss.item())
        losses.append(sum(epoch) / len(epoch))
    return losses


@pytest.mark.parametrize("recording_fails", [False, True])
def test_recorded_step_bookkeeping_trains_like_the_plain_step(recording_fails, monkeypatch, caplog):
    """train.cuda_graph's bookkeeping, with the recording replaced by plain calls (no GPU here):
    the warm-up steps that recording runs are undone, the step is recorded on a full-size batch
    and replayed on full-size ones, a short last batch (first in some shuffled epochs) takes the
    plain step, and the parameters end where a plain loop puts them. Where recording fails after
    its warm-up steps, the run warns, undoes them and goes on with the plain step."""
    import lightning as L

    from omniquant_pl import graph_step
    from omniquant_pl.calib.batches import cached_batch_loader
    from omniquant_pl.config import QuantConfig

    calls = {"recorded": 0, "replays": 0}

    def record_by_calling(step, warmup_steps):  # runs what the GPU runs: warm-up steps, then one to record
        calls["recorded"] += 1
        for _ in range(warmup_steps + 1):
            step()
        if recording_fails:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay():
            calls["replays"] += 1
            step()
        return replay

    monkeypatch.setattr(graph_step, "record_cuda_graph", record_by_calling)
    quant, epochs = QuantConfig(wbits=3, let=True), 4
    train = TrainConfig(epochs=epochs, batch_size=2, shuffle=True, steps_per_call=2)
    lit, inputs, targets = _tiny_block_module(quant, train, samples=5)  # batches of 2, 2 and 1
    lit.enable_cuda_graph(None)
    loader = cached_batch_loader(inputs, targets, batch_size=2, shuffle=True, seed=3, steps_per_call=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, train_dataloaders=loader)
    assert calls["recorded"] == 1
    if recording_fails:
        assert not lit.graphed and calls["replays"] == 0
        assert "recording the step as a CUDA graph failed (RuntimeError: operation not permitted" in caplog.text
    else:
        assert lit.graphed and calls["replays"] == 2 * epochs  # full-size batches; the short one: plain step
    first_batches = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        first_batches.append(next(iter(loader))[0][0].shape[0])
    assert 1 in first_batches  # some epoch began with the short batch, before anything was recorded

    plain, _, _ = _tiny_block_module(quant, train, samples=5)
    losses = _plain_loop_epoch_losses(plain, inputs, targets, batch_size=2, seed=3, epochs=epochs)
    assert lit.epoch_losses == pytest.approx(losses, rel=1e-6)
    learned, expected = lit.learned_state(), plain.learned_state()
    for key in expected:
        torch.testing.assert_close(learned[key], expected[key], rtol=1e-6, atol=1e-7)


def test_chunked_loader_keeps_the_batch_order_and_reshuffles_by_epoch_only():
    from omniquant_pl.calib.batches import cached_batch_loader

    rows = torch.arange(10.0).view(10, 1, 1)
    plain = cached_batch_loader(rows, batch_size=2, shuffle=True, seed=1)
    chunked = cached_batch_loader(rows, batch_size=2, shuffle=True, seed=1, steps_per_call=3)
    orders = []
    for epoch in (0, 1, 0):
        plain.sampler.set_epoch(epoch)
        chunked.sampler.set_epoch(epoch)
        order = [batch[0].flatten().tolist() for batch in plain]
        assert order == [batch[0].flatten().tolist() for batch in plain]  # iterating again: same order
        chunks = [[batch[0].flatten().tolist() for batch in chunk] for chunk in chunked]
        assert [len(c) for c in chunks] == [3, 2] and len(chunked) == 2
        assert [b for chunk in chunks for b in chunk] == order
        orders.append(order)
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[0]) == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]] != orders[0]
    fixed = cached_batch_loader(rows, batch_size=4, shuffle=False, seed=1)
    assert [batch[0].flatten().tolist() for batch in fixed] == [[0.0, 1, 2, 3], [4.0, 5, 6, 7], [8.0, 9]]


def test_cuda_graph_mode_without_a_gpu_trains_like_the_default(tmp_path, tokenizer, caplog):
    """Without a GPU train.cuda_graph says so and runs the plain step."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    from omniquant_pl import CalibConfig, EvalConfig, QuantConfig, calibrate

    def run(name, cuda_graph, steps_per_call):
        config = RunConfig(
            model=ModelConfig("tiny"), quant=QuantConfig(wbits=3),
            calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
            train=TrainConfig(epochs=2, batch_size=2, cuda_graph=cuda_graph, steps_per_call=steps_per_call),
            eval=EvalConfig(datasets=[], baselines=[]), output_dir=str(tmp_path / name), save_model=False,
        )
        results = calibrate(config, model=tiny_llama(), tokenizer=tokenizer)
        return results, load_file(tmp_path / name / "learned_params.safetensors")

    default_results, default = run("default", "auto", 16)
    assert "train.cuda_graph" not in caplog.text  # auto: off on the CPU, without a word
    graph_results, graph = run("graph", True, 1)
    assert not any(block.cuda_graph_step for block in graph_results.blocks)
    assert caplog.text.count("train.cuda_graph needs one CUDA process") == 1
    for key in default:
        torch.testing.assert_close(default[key], graph[key], rtol=1e-6, atol=1e-7)
    assert [b.final_loss for b in default_results.blocks] == pytest.approx(
        [b.final_loss for b in graph_results.blocks], rel=1e-6)


@pytest.mark.parametrize("choice, device, precision, compile_mode, expected", [
    ("auto", "cuda", "bf16-mixed", "block", True),
    ("auto", "cuda", "bf16-mixed", "off", False),
    ("auto", "cuda", "16-mixed", "block", False),
    ("auto", "cpu", "32-true", "block", False),
    (True, "cuda", "bf16-mixed", "off", True),
    (True, "cpu", "32-true", "off", False),
    (False, "cuda", "bf16-mixed", "block", False),
])
def test_cuda_graph_auto_is_on_only_for_the_compiled_step_on_cuda(choice, device, precision, compile_mode, expected):
    from omniquant_pl.plan import resolve_cuda_graph

    assert resolve_cuda_graph(choice, torch.device(device), precision, compile_mode, distributed=False) is expected
    # a data-parallel run never records the step (a graph cannot hold DDP's all-reduce)
    assert resolve_cuda_graph(choice, torch.device(device), precision, compile_mode, distributed=True) is False


def test_cuda_graph_rejects_other_values():
    with pytest.raises(ConfigError, match="train.cuda_graph must be one of true, false, auto"):
        TrainConfig(cuda_graph="yes")


def test_on_device_yields_every_batch_in_order_on_the_device():
    from omniquant_pl.calib.prefetch import on_device

    batches = [(torch.full((2, 3), float(i)), torch.full((2, 3), -float(i))) for i in range(5)]
    moved = list(on_device(iter(batches), torch.device("cpu")))
    assert len(moved) == 5
    for (a, b), (x, y) in zip(batches, moved):
        assert x is a and y is b  # already there: no copy
    meta = list(on_device(batches, torch.device("meta")))
    assert [t.device.type for batch in meta for t in batch] == ["meta"] * 10
    assert list(on_device([], torch.device("cpu"))) == []


def test_on_device_copies_the_next_host_batch_during_the_step_on_the_current_one(monkeypatch):
    """The CUDA branch with stand-ins for streams and tensors (no GPU here): batch i+1 is copied on
    the side stream before the step on batch i is issued, and the compute stream waits for a
    batch's copy (and keeps its memory) before the step reads it."""
    import contextlib

    from omniquant_pl.calib import prefetch

    log = []

    class Device:
        def __init__(self, type):
            self.type, self.index = type, 0

        def __eq__(self, other):
            return self.type == other.type

    cuda, cpu = Device("cuda"), Device("cpu")

    class Tensor:
        def __init__(self, name, device):
            self.name, self.device = name, device

        def to(self, device, non_blocking=False):
            log.append(("copy", self.name, non_blocking))
            return Tensor(self.name, device)

        def record_stream(self, stream):
            log.append(("keep", self.name, stream.name))

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    compute = Stream("compute")
    monkeypatch.setattr(prefetch.torch.cuda, "Stream", lambda device: Stream("copy"))
    monkeypatch.setattr(prefetch.torch.cuda, "current_stream", lambda device: compute)
    monkeypatch.setattr(prefetch.torch.cuda, "stream", lambda s: contextlib.nullcontext())

    batches = [(Tensor(f"x{i}", cpu), Tensor(f"y{i}", cpu)) for i in range(3)] + [(Tensor("z", cuda),)]
    for batch in prefetch.on_device(batches, cuda):
        assert all(t.device == cuda for t in batch)
        log.append(("step", batch[0].name))

    def at(entry):
        return log.index(entry)

    for i in range(3):
        assert at(("copy", f"x{i}", True)) < at(("step", f"x{i}"))
        wait = max(n for n, e in enumerate(log[: at(("step", f"x{i}"))]) if e == ("wait", "compute", "copy"))
        assert wait > at(("copy", f"y{i}", True))  # the step waits for its own batch's copy
        assert ("keep", f"x{i}", "compute") in log
        if i > 0:  # issued before the step on the previous batch, so the copy runs alongside it
            assert at(("step", f"x{i - 1}")) > at(("copy", f"x{i}", True))
    assert ("copy", "z", True) not in log and log[-1] == ("step", "z")  # already on the device
    assert log.count(("wait", "compute", "copy")) == 3


def test_paper_table_lists_every_stored_paper_scale_run(tmp_path, monkeypatch):
    """benchmarks/paper_table.py reads the stored GPU JSON (no GPU needed) and puts ours beside the official."""
    import paper_table

    stored = sorted(paper_table.RESULTS.glob("paper-smollm2-135m-*-h200.json"))
    if not stored:
        pytest.skip("no stored paper-scale results")
    monkeypatch.setattr(paper_table, "RESULTS", tmp_path)
    for path in stored:
        (tmp_path / path.name).write_text(path.read_text())
    text = paper_table.main(["--card", "h200"])
    rows = [line for line in text.splitlines() if line.startswith("| W")]
    assert len(rows) == sum("-e2-" not in p.name for p in stored)
    w3 = json.loads((tmp_path / "paper-smollm2-135m-W3A16-h200.json").read_text())["rows"][0]["perplexity"]
    assert f"**{w3['omniquant']:.2f}**" in text and "65.99" in text
    assert (tmp_path / "paper-smollm2-135m-h200.md").read_text() == text
