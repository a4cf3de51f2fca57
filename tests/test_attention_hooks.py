"""The quantized attention path: with no quantizer it is SDPA exactly, masks included (padding,
sliding windows); with activation quantization, q/k/v are quantized or calibration fails loudly."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, tiny_llama

from omniquant_pl import (
    CalibConfig,
    CalibrationCallback,
    EvalConfig,
    ModelConfig,
    QuantConfig,
    RunConfig,
    TrainConfig,
    calibrate,
)
from omniquant_pl.arch import get_arch
from omniquant_pl.arch.registry import get_blocks
from omniquant_pl.block_module import BlockModule
from omniquant_pl.calib.capture import capture_block_inputs
from omniquant_pl.errors import AttentionNotQuantizedError
from omniquant_pl.quant.act import PerTokenActQuantizer
from omniquant_pl.quant.activation_hooks import ATTENTION_NAME, use_quantized_attention

SEQLEN = 12
WINDOW = 4  # < SEQLEN: the window changes every logit after position WINDOW


def _tiny_sliding_window_model(family: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=WINDOW)).eval()
    config = Qwen2Config(**shape, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
    assert set(config.layer_types) == {"sliding_attention"}
    return Qwen2ForCausalLM(config).eval()


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(3, TINY_VOCAB, (3, SEQLEN), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding of different lengths; row 2 unpadded
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


@torch.no_grad()
def _logits_reference_then_quantized_path(model, reference: str, input_ids, attention_mask=None):
    """Logits of the model's own attention `reference`, then through ATTENTION_NAME (no quantizer
    installed: the same math). Compared where tokens are real (padded queries see no key)."""
    model.set_attn_implementation(reference)
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)
    use_quantized_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool() if attention_mask is not None else torch.ones(input_ids.shape, dtype=torch.bool)
    return got[real], expected[real]  # (real tokens, vocab)


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_quantized_path_keeps_the_padding_mask(reference):
    input_ids, attention_mask = _left_padded_batch()
    got, expected = _logits_reference_then_quantized_path(tiny_llama(), reference, input_ids, attention_mask)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("padded", [False, True])
def test_quantized_path_keeps_the_sliding_window(family, reference, padded):
    input_ids, attention_mask = _left_padded_batch()
    attention_mask = attention_mask if padded else None
    model = _tiny_sliding_window_model(family)
    with torch.no_grad():  # the window matters here: one as long as the sequence changes the logits
        windowed = model(input_ids=input_ids).logits
        model.config.sliding_window = SEQLEN
        assert not torch.allclose(model(input_ids=input_ids).logits, windowed, atol=1e-3)
        model.config.sliding_window = WINDOW
    got, expected = _logits_reference_then_quantized_path(model, reference, input_ids, attention_mask)
    torch.testing.assert_close(got, expected)


# -- q/k/v activation quantization is applied, or calibration stops --------------------------------
def _w4a4_block_module(routed: bool) -> tuple[BlockModule, torch.Tensor]:
    model = tiny_llama(layers=1)
    if routed:
        use_quantized_attention(model)
    spec = get_arch(model)
    windows = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, spec, windows)
    module = BlockModule(get_blocks(model, spec)[0], 0, spec, captured.block_kwargs,
                         QuantConfig(wbits=4, abits=4), TrainConfig())
    return module, captured.hidden_states


def test_block_forward_counts_qkv_quantization_and_refuses_an_unrouted_attention():
    module, hidden = _w4a4_block_module(routed=True)
    with torch.no_grad():
        module(hidden)
        module(hidden)
    assert module.act_quantizers.qkv_calls == 2  # one attention call per block forward

    module, hidden = _w4a4_block_module(routed=False)
    with torch.no_grad(), pytest.raises(AttentionNotQuantizedError, match="block 0: 4-bit activations") as err:
        module(hidden)
    assert "\n" not in str(err.value) and "use_quantized_attention(model)" in str(err.value)


class _QkvRecorder(CalibrationCallback):
    """Per block: the installed activation quantizers; per Lightning epoch: a marker."""

    def __init__(self) -> None:
        self.act_quantizers = []
        self.epochs = 0

    def on_block_start(self, sequencer, index, module):
        self.act_quantizers.append(module.act_quantizers)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1


def _w4a4_run(tmp_path, tokenizer, train: TrainConfig, recorder: _QkvRecorder) -> dict:
    cfg = RunConfig(model=ModelConfig("in-memory"), quant=QuantConfig(wbits=4, abits=4),
                    calib=CalibConfig(source="pydoc", nsamples=4, seqlen=32), train=train,
                    eval=EvalConfig(datasets=["pydoc"], seqlen=32, max_windows=1, baselines=[]),
                    output_dir=str(tmp_path / "w4a4"), save_model=False)
    return calibrate(cfg, callbacks=[recorder], model=tiny_llama(), tokenizer=tokenizer)


def test_w4a4_calibration_quantizes_qkv_of_every_block(tmp_path, tokenizer, monkeypatch):
    quantized_shapes = []  # every (B, heads, T, head_dim) input of an activation quantizer: q, k, v
    forward = PerTokenActQuantizer.forward

    def recording_forward(self, x):
        if x.ndim == 4:
            quantized_shapes.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(PerTokenActQuantizer, "forward", recording_forward)
    recorder = _QkvRecorder()
    _w4a4_run(tmp_path, tokenizer, TrainConfig(epochs=2, batch_size=2), recorder)
    assert len(recorder.act_quantizers) == 2 and recorder.epochs == 4
    # every block's q/k/v quantizer ran: loss passes and all 2 epochs x 2 batches of training
    assert all(quantizers.qkv_calls >= 2 * 2 for quantizers in recorder.act_quantizers)
    heads = {shape[1] for shape in quantized_shapes}
    assert heads == {4, 2} and {shape[3] for shape in quantized_shapes} == {16}  # q: 4 heads, k/v: 2 (GQA)


@pytest.mark.parametrize("train", [
    TrainConfig(epochs=2, batch_size=2),  # the RTN loss pass is the first forward
    TrainConfig(epochs=2, batch_size=2, report_losses=False, compile="off"),  # the first training step
    TrainConfig(epochs=2, batch_size=2, report_losses=False, compile="block"),  # warm_up, before compiling
], ids=["loss-pass", "eager-step", "compiled-step"])
def test_w4a4_calibration_without_routed_attention_fails_before_training(tmp_path, tokenizer, monkeypatch, train):
    monkeypatch.setattr("omniquant_pl.sequencer.use_quantized_attention", lambda model: None)
    recorder = _QkvRecorder()
    with pytest.raises(AttentionNotQuantizedError, match="q/k/v were not quantized: the model's attention runs 'sdpa'"):
        _w4a4_run(tmp_path, tokenizer, train, recorder)
    assert len(recorder.act_quantizers) <= 1 and recorder.epochs == 0  # block 0, before any epoch ended
