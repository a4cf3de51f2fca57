"""llama.cpp's K-quants: RTN equals llama.cpp's own quantizer byte for byte, training stays on the
grid llama.cpp stores, and a run calibrated for a K-quant mix exports exactly and scores in llama.cpp."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from grid_checks import awkward_rows, check_training_stays_on_the_grid, decoded, libggml

from omniquant_pl.quant.kquant_grid import K_GRIDS, KQuantizer, pack_kquant
from omniquant_pl.quant.kquant_pack import BLOCK_BYTES

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")


def _reference(x: torch.Tensor, type_name: str) -> np.ndarray:
    """llama.cpp's own bytes: quantize_row_<type>_ref from the installed libggml-base."""
    function = libggml(f"quantize_row_{type_name[:2].lower()}_K_ref")
    function.restype = None
    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    out = np.zeros(data.size // 256 * BLOCK_BYTES[type_name], dtype=np.uint8)
    function(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(data.size))
    return out.reshape(x.shape[0], -1)


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
def test_rtn_is_llama_cpps_quantizer_byte_for_byte(type_name):
    for name, x in awkward_rows().items():
        weight = KQuantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
        packed = pack_kquant(type_name, weight)
        assert np.array_equal(packed, _reference(x, type_name)), name
        assert torch.equal(decoded(packed, type_name), weight.dequantize()), name


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
@pytest.mark.parametrize("magnitude", [1e-6, 1e-30])
def test_values_below_fp16_equal_llama_cpps(type_name, magnitude):
    """A super-block whose fp16 factor underflows to 0: llama.cpp still writes sub-scales that multiply 0,
    the export writes 0; the stored values are the same (all zero)."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * magnitude
    weight = KQuantizer(tuple(x.shape), type_name, learnable_clipping=False).quantize(x)
    assert torch.equal(decoded(pack_kquant(type_name, weight), type_name), decoded(_reference(x, type_name), type_name))


@pytest.mark.parametrize("type_name", sorted(K_GRIDS))
def test_training_moves_the_stored_integers_and_stays_on_the_grid(type_name):
    check_training_stays_on_the_grid(KQuantizer, pack_kquant, type_name)


@pytest.mark.parametrize(("file_type", "stored_types"), [
    ("Q4_K_M", {"Q4_K", "Q6_K"}),  # the "more bits" layer's attn_v and ffn_down in Q6_K
    ("IQ4_NL", {"IQ4_NL", "Q5_K"}),  # attn_v in Q5_K: four query heads per key/value head
    ("IQ4_XS", {"IQ4_XS", "Q5_K"}),
])
def test_a_run_calibrated_for_a_gguf_file_type_exports_exactly_and_scores_in_llama_cpp(tmp_path, tokenizer, file_type,
                                                                                        stored_types):
    """A model whose rows are multiples of 256: every linear calibrated on the type llama.cpp stores it in
    (its rules); the file holds exactly the run's weights and llama.cpp scores it like them (the IQ4 runs
    start at quant.lwc_search's factors)."""
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
    calibrate(RunConfig(model=ModelConfig(str(tmp_path / "model")), quant=QuantConfig(gguf_type=file_type, rounding=True,
                                                                         lwc_search=file_type != "Q4_K_M"),
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
