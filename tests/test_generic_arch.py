"""Causal LMs with no architecture-table entry (GPT-NeoX, Phi): weight-only LWC on every nn.Linear
of each decoder block, the blocks and their linears found on the model itself."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import TINY_VOCAB, tiny_llama
from safetensors.torch import load_file
from torch import nn

from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.calib.capture import capture_block_inputs, run_block
from omniquant_pl.errors import UnsupportedArchitectureError
from omniquant_pl.quant.codes import codes_path, load_block_codes

NEOX_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
WARNING = "LET and activation quantization need a table entry in omniquant_pl/arch/tables.py"


def tiny_gpt_neox(seed: int = 0, layers: int = 2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config).eval()


def tiny_phi(seed: int = 0, layers: int = 2):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, max_position_embeddings=512)
    return PhiForCausalLM(config).eval()


BUILDERS = {"gpt_neox": tiny_gpt_neox, "phi": tiny_phi}


def _heavy_tailed_(model):
    """Outlier-heavy block weights, as in real LLMs: clipping then beats round-to-nearest."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and ".layers." in name:
                param.copy_(torch.distributions.StudentT(2.5).sample(param.shape) * 0.02)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generic_spec_finds_the_blocks_and_every_linear_in_them(family):
    model = BUILDERS[family](layers=3)
    spec = get_arch(model)
    assert spec.weight_only and spec.name == family
    blocks = get_blocks(model, spec)
    assert len(blocks) == 3
    prefix = f"{spec.backbone}.{spec.layers}"
    listed = {f"{prefix}.{i}.{name}" for i in range(3) for name in spec.linear_names}
    every_linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert listed == every_linear - {"lm_head"}  # every block linear, nothing else
    for block in blocks:
        assert spec.linear_names == tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
    if family == "gpt_neox":
        assert (spec.backbone, spec.layers, spec.linear_names) == ("gpt_neox", "layers", NEOX_LINEARS)
    # the backbone found is the one that runs these blocks: captured inputs chain like the model
    windows = torch.randint(0, TINY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, spec, windows)
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True).hidden_states
        torch.testing.assert_close(captured.hidden_states, reference[0])
        hidden = captured.hidden_states
        for i, block in enumerate(blocks[:2]):
            hidden = run_block(block, hidden, captured.block_kwargs)
            torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-5, atol=1e-5)


def test_models_the_generic_path_cannot_describe_fail_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2)
    gpt2 = GPT2LMHeadModel(config)  # its blocks hold Conv1D layers, no nn.Linear
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture 'gpt2'.*llama.*opt"):
        get_arch(gpt2)
    uneven = tiny_gpt_neox()
    uneven.gpt_neox.layers[1].mlp.dense_4h_to_h = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match=r"blocks of gpt_neox.layers differ.*block 1 has \["):
        get_arch(uneven)
    assert not get_arch(tiny_llama()).weight_only  # a family with a table entry keeps it


def _config(output_dir, quant, model="in-memory", **overrides) -> RunConfig:
    return RunConfig(
        model=ModelConfig(str(model)), quant=quant, calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32),
        train=TrainConfig(epochs=6, batch_size=2, lwc_lr=5e-2),
        eval=overrides.pop("eval", EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=2)),
        output_dir=str(output_dir), **overrides,
    )


@pytest.mark.parametrize("quant, option", [
    (QuantConfig(wbits=4, let=True), "quant.let true"),
    (QuantConfig(wbits=4, abits=4), "quant.abits 4"),
], ids=["let", "abits4"])
def test_let_or_activation_quantization_is_refused_before_any_work(tmp_path, tokenizer, quant, option):
    from omniquant_pl.preflight import check_run

    model_dir = tmp_path / "neox"
    tiny_gpt_neox().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for run in (lambda: check_run(_config(tmp_path / "a", quant, model_dir)),  # from config.json, before loading
                lambda: calibrate(_config(tmp_path / "b", quant), model=tiny_gpt_neox(), tokenizer=tokenizer)):
        with pytest.raises(UnsupportedArchitectureError) as err:
            run()
        message = str(err.value)
        assert "\n" not in message and message.startswith(option), message
        assert "'gpt_neox' has no entry in omniquant_pl/arch/tables.py" in message
        assert "llama, mistral, mixtral, opt, phi3, qwen2, qwen3, qwen3_moe" in message and "--quant.let false --quant.abits 16" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_let_and_activation_code_is_never_reached_for_a_weight_only_spec():
    from omniquant_pl.block_module import BlockModule
    from omniquant_pl.quant.rtn import rtn_model

    model = tiny_gpt_neox()
    spec = get_arch(model)
    with pytest.raises(UnsupportedArchitectureError, match="quant.abits 8"), \
            rtn_model(model, spec, QuantConfig(wbits=4, abits=8)):
        pass
    with pytest.raises(UnsupportedArchitectureError, match="quant.let true"):
        BlockModule(get_blocks(model, spec)[0], 0, spec, {}, QuantConfig(wbits=4, let=True), TrainConfig())


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory, tokenizer):
    """A finished weight-only W3A16g16 run of a tiny GPT-NeoX, with the warnings it logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("omniquant_pl")
    logger.addHandler(handler)
    model = tiny_gpt_neox()
    _heavy_tailed_(model)
    output = tmp_path_factory.mktemp("neox") / "run"
    try:
        results = calibrate(_config(output, QuantConfig(wbits=3, group_size=16)), model=model, tokenizer=tokenizer)
    finally:
        logger.removeHandler(handler)
    return output, results, [r.getMessage() for r in records]


def test_weight_only_run_learns_clipping_and_ends_on_the_grid(neox_run):
    from transformers import AutoModelForCausalLM

    from omniquant_pl.export.run import CalibratedRun
    from omniquant_pl.quant.codes import QuantizedWeight

    output, results, warnings = neox_run
    assert sum(WARNING in message for message in warnings) == 1, warnings  # once per run
    assert results.model_type == "gpt_neox" and len(results.blocks) == 2
    for block in results.blocks:  # LWC trained (keep_best alone would only give <=)
        assert block.final_loss < min(0.98 * block.rtn_loss, block.init_loss), block
    assert set(results.perplexity) == {"fp", "rtn", "omniquant"}  # the RTN baseline runs on the generic spec
    saved = AutoModelForCausalLM.from_pretrained(output / "model")
    for index, block in enumerate(saved.gpt_neox.layers):
        codes = load_block_codes(output, index)
        assert tuple(codes) == NEOX_LINEARS
        for name, weight in codes.items():
            stored = block.get_submodule(name).weight
            assert torch.equal(stored, weight.dequantize(stored.dtype)), name
            assert max(g.unique().numel() for g in stored.reshape(-1, 16)) <= 8  # 3 bits per group of 16
    run = CalibratedRun.open(output)  # exporters find the linears from the saved config alone
    quantized = [key for key, value in run.tensors_in_order() if isinstance(value, QuantizedWeight)]
    assert sorted(quantized) == sorted(f"gpt_neox.layers.{i}.{n}.weight" for i in range(2) for n in NEOX_LINEARS)


def test_weight_only_run_resumes_to_the_same_parameters(neox_run, tmp_path, tokenizer):
    """Cut a finished run back to one block and resume it: the same learned parameters and codes."""
    output, _, _ = neox_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output, resumed, ignore=shutil.ignore_patterns("model", "logs", "learned_params.safetensors"))
    state = json.loads((resumed / "checkpoint.json").read_text())
    state["finished_blocks"], state["results"]["blocks"] = 1, state["results"]["blocks"][:1]
    (resumed / "checkpoint.json").write_text(json.dumps(state))
    for path in (resumed / "learned" / "block_001.safetensors", codes_path(resumed, 1)):
        path.unlink()
    model = tiny_gpt_neox()
    _heavy_tailed_(model)
    results = calibrate(_config(resumed, QuantConfig(wbits=3, group_size=16), resume=True, save_model=False,
                                eval=EvalConfig(datasets=[])), model=model, tokenizer=tokenizer)
    assert results.resumed_at_block == 1 and len(results.blocks) == 2
    expected, got = load_file(output / "learned_params.safetensors"), load_file(resumed / "learned_params.safetensors")
    assert got.keys() == expected.keys() and any(k.startswith("layers.1.") for k in expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for index in (0, 1):
        assert all(torch.equal(a.codes, b.codes) for a, b in zip(load_block_codes(output, index).values(),
                                                               load_block_codes(resumed, index).values()))
