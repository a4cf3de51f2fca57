"""Tiny random models per family, a tiny offline tokenizer, and paths to shared reference data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_VOCAB = 384


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["OMNIQUANT_CACHE"] = str(tmp_path_factory.mktemp("omniquant_cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_tokenizer():
    """A small BPE tokenizer trained on CPython's documentation text (offline, ~1 s)."""
    from pydoc_data import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = list(topics.topics.values())[:200]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0, layers: int = 2):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64, dropout=0.1, attention_dropout=0.1,
    )
    return OPTForCausalLM(config).eval()


TINY_BUILDERS = {"llama": tiny_llama, "opt": tiny_opt}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", params=sorted(TINY_BUILDERS))
def tiny_model_dir(request, tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random model + tokenizer folder, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    TINY_BUILDERS[request.param]().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    from pydoc_data import topics

    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(list(topics.topics.values())[:60]), encoding="utf-8")
    return path


def requires_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@pytest.fixture(scope="session")
def calibrated_run(tmp_path_factory, tokenizer):
    """A factory of finished tiny-Llama runs (2 blocks, 2 epochs), one per quantization setting, cached
    for the session: calibrated_run(wbits=4, group_size=32, symmetric=True) -> output directory.
    q/k are scaled up 20x (peaked attention) and the head 2x: a wrong rope row order for llama.cpp
    then moves every window's NLL by >= 1.2e-2 nats (with plain random init: by 4e-4)."""
    from omniquant_pl import CalibConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, calibrate

    model_dir = tmp_path_factory.mktemp("tiny_llama_for_runs")
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
        model.lm_head.weight.mul_(2)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runs: dict[tuple, Path] = {}

    def run(**quant) -> Path:
        key = tuple(sorted(quant.items()))
        if key not in runs:
            output = tmp_path_factory.mktemp("run")
            calibrate(RunConfig(
                model=ModelConfig(str(model_dir)), quant=QuantConfig(**quant),
                calib=CalibConfig(source="pydoc", nsamples=4, seqlen=64), train=TrainConfig(epochs=2),
                eval=EvalConfig(datasets=["pydoc"], seqlen=64, max_windows=1, baselines=[]), output_dir=str(output),
            ))
            runs[key] = output
        return runs[key]

    return run
