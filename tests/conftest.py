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
