"""llama.cpp's K-quants: RTN equals llama.cpp's own quantizer byte for byte, training stays on the
grid llama.cpp stores, and a run calibrated for a K-quant mix exports exactly and scores in llama.cpp."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from omniquant_pl.quant.kquant_grid import K_GRIDS, KQuantizer, pack_kquant
from omniquant_pl.quant.kquant_pack import BLOCK_BYTES

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")


def _reference(x: torch.Tensor, type_name: str) -> np.ndarray:
    """llama.cpp's own bytes: quantize_row_<type>_ref from the installed libggml-base."""
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    function = getattr(library, f"quantize_row_{type_name[:2].lower()}_K_ref")
    function.restype = None
    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    out = np.zeros(data.size // 256 * BLOCK_BYTES[type_name], dtype=np.uint8)
    function(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(data.size))
    return out.reshape(x.shape[0], -1)


def _decoded(packed: np.ndarray, type_name: str) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(packed, getattr(gguf.GGMLQuantizationType, type_name)).copy())


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(8, 512, generator=g) / torch.rand(8, 512, generator=g).clamp_min(0.02)  # a few 50x outliers
    return {
        "normal": torch.randn(8, 512, generator=g), "heavy-tailed": heavy,
        "bf16-valued": torch.randn(8, 512, generator=g).bfloat16().float(),
        "ties": torch.randint(-8, 8, (8, 512), generator=g).float() * 0.25,
        "all-positive": torch.rand(8, 512, generator=g), "all-negative": -torch.rand(8, 512, generator=g),
        "zeros": torch.zeros(8, 512), "one-outlier": torch.zeros(8, 512).index_fill_(1, torch.tensor([3]), 5.0),
        "constant": torch.full((8, 512), 0.3), "fp16-subnormal-factors": torch.randn(8, 512, generator=g) * 1e-4,
    }


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
def test_rtn_is_llama_cpps_quantizer_byte_for_byte(type_name):
    for name, x in _inputs().items():
        weight = KQuantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
        packed = pack_kquant(type_name, weight)
        assert np.array_equal(packed, _reference(x, type_name)), name
        assert torch.equal(_decoded(packed, type_name), weight.dequantize()), name


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
@pytest.mark.parametrize("magnitude", [1e-6, 1e-30])
def test_values_below_fp16_equal_llama_cpps(type_name, magnitude):
    """A super-block whose fp16 factor underflows to 0: llama.cpp still writes sub-scales that multiply 0,
    the export writes 0; the stored values are the same (all zero)."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * magnitude
    weight = KQuantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
    assert torch.equal(_decoded(pack_kquant(type_name, weight), type_name), _decoded(_reference(x, type_name), type_name))


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
def test_training_moves_the_stored_integers_and_stays_on_the_grid(type_name):
    torch.manual_seed(0)
    x = torch.randn(16, 512)
    inputs = torch.randn(64, 512) * torch.rand(512).pow(4) * 4  # activations with outlier channels

    def output_error(weight: torch.Tensor) -> torch.Tensor:  # what a block loss sees, unlike llama.cpp's search
        return ((inputs @ (weight - x).T) ** 2).mean()

    quantizer = KQuantizer(tuple(x.shape), type_name, learn_rounding=True)
    rtn = quantizer(x).detach()
    assert torch.equal(rtn, KQuantizer(tuple(x.shape), type_name, learnable_clipping=False)(x))  # identity at init
    optimizer = torch.optim.Adam([{"params": quantizer.freedom_parameters("lwc"), "lr": 0.01},
                                  {"params": quantizer.freedom_parameters("rounding"), "lr": 0.002}])
    for _ in range(60):
        loss = output_error(quantizer(x))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in quantizer.freedom_parameters())
        optimizer.step()
    trained = quantizer(x).detach()
    assert output_error(trained) < 0.95 * output_error(rtn)  # it learned something (measured: 0.71 to 0.87 of RTN)
    weight = quantizer.quantize(x)
    assert not weight.problems()
    assert torch.equal(weight.dequantize(), trained)  # the codes are the forward's values
    assert torch.equal(_decoded(pack_kquant(type_name, weight), type_name), trained)  # and the file's
    quantizer.disable_clipping()
    assert torch.equal(quantizer(x), rtn)


@pytest.mark.parametrize(("file_type", "stored_types"), [
    ("Q4_K_M", {"Q4_K", "Q6_K"}),  # the "more bits" layer's attn_v and ffn_down in Q6_K
    ("IQ4_NL", {"IQ4_NL", "Q5_K"}),  # attn_v in Q5_K: four query heads per key/value head
    ("IQ4_XS", {"IQ4_XS", "Q5_K"}),
])
def test_a_run_calibrated_for_a_gguf_file_type_exports_exactly_and_scores_in_llama_cpp(tmp_path, tokenizer, file_type,
                                                                                        stored_types):
    """A model whose rows are multiples of 256: every linear calibrated on the type llama.cpp stores it in
    (its rules); the file holds exactly the run's weights and llama.cpp scores it like them."""
    from conftest import TINY_VOCAB
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
    from omniquant_pl.eval.llama_cpp import gguf_perplexity
    from omniquant_pl.eval.perplexity import window_mean_nll
    from omniquant_pl.export import ExportConfig, export_run
    from omniquant_pl.quant.codes import load_block_codes
    from omniquant_pl.quant.gguf_mix import ModelShape, linear_type

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    calibrate(RunConfig(model=ModelConfig(str(tmp_path / "model")), quant=QuantConfig(gguf_type=file_type, rounding=True),
                        calib=CalibConfig(source="pydoc", nsamples=4, seqlen=64), train=TrainConfig(epochs=2),
                        eval=EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=1, baselines=["rtn"]),
                        output_dir=str(tmp_path / "run")))
    bits = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "IQ4_NL": 8, "IQ4_XS": 8}  # IQ4 codes hold the level values
    for block in (0, 1):
        for name, weight in load_block_codes(tmp_path / "run", block).items():
            assert weight.bits == bits[linear_type(file_type, name, block, weight.shape[1], ModelShape.of(config))]
    report = export_run(tmp_path / "run", ExportConfig(format="gguf", output=str(tmp_path / "gguf")))
    assert report["exact"] and report["values_exact"] and report["verified_tensors"] == 14
    assert report["exact_tensors"] == 14 and stored_types <= set(report["tensor_types"])
    path = next((tmp_path / "gguf").glob("*.gguf"))
    from gguf.quants import dequantize

    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        for module, name in ((reference.model.embed_tokens, "token_embd.weight"), (reference.lm_head, "output.weight")):
            tensor = stored[name]
            module.weight.copy_(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).view_as(module.weight))
    ids = torch.randint(3, TINY_VOCAB, (4 * 64,), generator=torch.Generator().manual_seed(1))
    llama_cpp_nll = torch.tensor(gguf_perplexity(path, ids, 64)["window_nll"])
    with torch.no_grad():
        torch_nll = window_mean_nll(reference(input_ids=ids.view(4, 64)).logits, ids.view(4, 64)).double()
    difference = (llama_cpp_nll - torch_nll).abs()
    assert difference.mean() < 5e-3 and difference.max() < 1e-2, (llama_cpp_nll, torch_nll)
