"""GGUF export of the Qwen2 (q/k/v biases), Qwen3 (q/k norms), Phi-3 (fused q/k/v and gate/up) and Gemma 3
(norms of 1 + w, sandwich norms, sliding-window layers) and Falcon (LayerNorm, parallel attention, fused and,
in its grouped layouts, regrouped q|k|v) families, and the Mixtral and Qwen3-MoE mixtures of experts (the
experts' gate, up and down stacks), scored by llama.cpp itself."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from omniquant_pl.export import ExportConfig, export_run

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

# as for the LLaMA family (tests/test_export_gguf.py): llama.cpp's fp16 KV cache, 8-bit activation blocks
# for quantized dot products and its summation order; q/k are scaled up so a wrong rope layout moves every
# window by far more
MEAN_TOLERANCE, MAX_TOLERANCE = 5e-3, 1e-2
FAMILIES = ("qwen2", "qwen3", "phi3", "gemma3", "falcon-40b", "mixtral", "qwen3_moe")


def tiny_family(family: str, tied: bool = False):
    import transformers
    from conftest import TINY_VOCAB

    if family.startswith("falcon"):  # falcon-<layout>: 7b (multi-query, one norm), 40b (grouped q|k|v, two norms), 11b
        from test_falcon import tiny_falcon

        model = tiny_falcon(family.split("-")[1])  # built with a tied head
        with torch.no_grad():  # peaked attention: the q|k|v row layout matters
            for layer in model.transformer.h:
                layer.self_attention.query_key_value.weight.mul_(6)
        if not tied:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        return model
    if family in ("mixtral", "qwen3_moe"):  # four experts, two per token, routers spread
        from test_moe import tiny_moe

        model = tiny_moe(family)
        with torch.no_grad():  # gate values of a few units: SiLU far from linear, so gate and up cannot swap unseen
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj.mul_(25)
        return model
    if family == "gemma3":  # three layers: sliding (window 4), full, sliding; every norm away from 0
        from test_gemma3 import tiny_gemma3

        model = tiny_gemma3()
        model.config.tie_word_embeddings = tied
        return model
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                                 "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[family]  # fused q/k/v
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                     tie_word_embeddings=tied, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):  # away from their initial 1 / 0
                param.add_(torch.randn_like(param) * 0.3)
        for layer in model.model.layers:  # peaked attention: the rope layout matters
            if family == "phi3":
                layer.self_attn.qkv_proj.weight[:96].mul_(8)  # the q (4 x 16) and k (2 x 16) rows
            else:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
    return model


def _window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    from omniquant_pl.eval.perplexity import window_mean_nll

    with torch.no_grad():
        return window_mean_nll(model(input_ids=ids.view(4, 64)).logits, ids.view(4, 64)).double()


def _llama_cpp_nll(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from omniquant_pl.eval.llama_cpp import gguf_perplexity

    return torch.tensor(gguf_perplexity(path, ids, 64)["window_nll"])


def _close(llama_cpp_nll: torch.Tensor, torch_nll: torch.Tensor) -> None:
    difference = (llama_cpp_nll - torch_nll).abs()
    assert difference.mean() < MEAN_TOLERANCE and difference.max() < MAX_TOLERANCE, (llama_cpp_nll, torch_nll)


IDS = torch.randint(3, 384, (4 * 64,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("phi3", False),
                                         ("gemma3", False), ("falcon-7b", True), ("falcon-40b", False),
                                         ("falcon-11b", False), ("mixtral", False), ("qwen3_moe", False)])
def test_float_model_in_llama_cpp_computes_what_transformers_does(tmp_path, tokenizer, family, tied):
    from omniquant_pl.export.gguf import model_to_gguf

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = tiny_family(family, tied)
    types = model_to_gguf(model, tmp_path / "model.gguf", "F32", tokenizer_folder=tmp_path / "tokenizer")
    expected = {"qwen2": "blk.0.attn_q.bias", "qwen3": "blk.0.attn_q_norm.weight", "phi3": "blk.0.attn_qkv.weight",
                "gemma3": "blk.0.post_ffw_norm.weight", "falcon-7b": "blk.0.attn_norm.bias",
                "falcon-40b": "blk.0.attn_norm_2.bias", "falcon-11b": "blk.0.attn_norm.bias",
                "mixtral": "blk.1.ffn_up_exps.weight", "qwen3_moe": "blk.1.ffn_gate_exps.weight"}
    assert expected[family] in types
    _close(_llama_cpp_nll(tmp_path / "model.gguf", IDS), _window_nll(model, IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_export_of_a_run_scores_in_llama_cpp_like_the_runs_model(tmp_path, tokenizer, family):
    """A run on the Q4_0 grid: the file holds its integers (read back), and llama.cpp scores it like the run's
    saved model holding what the file stores (the run's linears; llama.cpp's own Q8_0 embeddings and head)."""
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    model = tiny_family(family)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    calibrate(RunConfig(model=ModelConfig(str(tmp_path / "model")),
                        quant=QuantConfig(wbits=4, symmetric=True, group_size=32, grid="gguf"),
                        calib=CalibConfig(source="pydoc", nsamples=4, seqlen=64), train=TrainConfig(epochs=1),
                        eval=EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=1, baselines=[]),
                        output_dir=str(tmp_path / "run")))
    # transformers' Qwen2 tokenizer class adds <|endoftext|> to the test's tiny tokenizer (a real Qwen tokenizer
    # has it): the run keeps the original 384-token files, one per embedding row, as a real model has
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "model" / name, tmp_path / "run" / "model" / name)
    report = export_run(tmp_path / "run", ExportConfig(format="gguf", gguf_type="Q4_0", output=str(tmp_path / "gguf")))
    fused = family in ("phi3", "falcon-40b")  # fused q/k/v (and Phi-3's gate/up); experts: q/k/v/o and 3 stacks
    linears = model.config.num_hidden_layers * (4 if fused else 7)
    assert report["exact"] and report["verified_tensors"] == linears and report["values_exact"]
    path = next((tmp_path / "gguf").glob("*.gguf"))
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        for hf_module, name in ((reference.get_input_embeddings(), "token_embd.weight"),
                                (reference.get_output_embeddings(), "output.weight")):
            tensor = stored[name]
            hf_module.weight.copy_(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).view_as(hf_module.weight))
    _close(_llama_cpp_nll(path, IDS), _window_nll(reference, IDS))
    if family in ("mixtral", "qwen3_moe"):  # the experts' codes: only GGUF writes them
        from omniquant_pl.errors import OmniQuantError

        with pytest.raises(OmniQuantError, match="--format gguf only"):
            export_run(tmp_path / "run", ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct")))


def test_falcon_layouts_llama_cpp_does_not_run_are_refused_in_one_line(tmp_path, tokenizer):
    from test_falcon import tiny_falcon

    from omniquant_pl.errors import OmniQuantError
    from omniquant_pl.export.gguf import model_to_gguf

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(OmniQuantError, match="ALiBi, sequential attention or biases"):
        model_to_gguf(tiny_falcon("rw"), tmp_path / "rw.gguf", "F32", tokenizer_folder=tmp_path / "tokenizer")


def test_a_gemma3_query_scale_llama_cpp_does_not_use_is_refused_in_one_line(tmp_path, tokenizer):
    from omniquant_pl.errors import OmniQuantError
    from omniquant_pl.export.gguf import model_to_gguf

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = tiny_family("gemma3")
    model.config.query_pre_attn_scalar = 256
    with pytest.raises(OmniQuantError, match="query_pre_attn_scalar"):
        model_to_gguf(model, tmp_path / "g.gguf", "F32", tokenizer_folder=tmp_path / "tokenizer")


def test_an_exact_export_of_an_eight_expert_model_is_refused_in_one_line(tmp_path, tokenizer):
    """llama.cpp puts an 8-expert model's attn_k and attn_v in Q8_0 whatever the file type."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate
    from omniquant_pl.errors import ConfigError

    MixtralForCausalLM(MixtralConfig(vocab_size=384, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    calibrate(RunConfig(model=ModelConfig(str(tmp_path / "model")),
                        quant=QuantConfig(wbits=4, symmetric=True, group_size=32, grid="gguf", lwc=False),
                        calib=CalibConfig(source="pydoc", nsamples=2, seqlen=32), train=TrainConfig(epochs=0),
                        eval=EvalConfig(datasets=[], baselines=[]), output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="8-expert model's attn_k and attn_v in Q8_0"):
        export_run(tmp_path / "run", ExportConfig(format="gguf", gguf_type="Q4_0", output=str(tmp_path / "gguf")))
