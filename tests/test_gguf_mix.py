"""llama.cpp's per-tensor types of a file type: our rules equal the types llama.cpp itself writes."""
from __future__ import annotations

import pytest
import torch

from omniquant_pl.errors import ConfigError
from omniquant_pl.quant.gguf_mix import FILE_TYPE_DEFAULTS, ROLES, ModelShape, check_file_type, linear_type

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

# (Q2_K_S needs an importance matrix in llama.cpp, so it is not compared here)
MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL",
         "Q4_0", "Q5_1", "Q8_0"]


def _llama(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int):
    from conftest import TINY_VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


# rows that are multiples of 256 (every K type applies; 16 layers: n/16, n/8 and more-bits all vary), with
# gqa 4 and 2; and 320-wide rows (K-quants fall back, down_proj's 512 do not)
SHAPES = {"k-rows-gqa4": (256, 512, 4, 1, 16), "k-rows-gqa2": (256, 512, 4, 2, 16), "fallback-rows": (320, 512, 5, 5, 8)}


@pytest.fixture(scope="module")
def written_types(tmp_path_factory, tokenizer):
    """(shape name, file type) -> {gguf tensor name: type} as llama.cpp's quantizer writes them."""
    from omniquant_pl.export.gguf import model_to_gguf

    folder = tmp_path_factory.mktemp("mix")
    tokenizer.save_pretrained(folder / "tokenizer")
    written = {}
    for shape_name, dims in SHAPES.items():
        model = _llama(*dims)
        for mix in MIXES:
            path = folder / f"{shape_name}-{mix}.gguf"
            written[shape_name, mix] = (model_to_gguf(model, path, mix, tokenizer_folder=folder / "tokenizer"), model.config)
            path.unlink()
    return written


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("mix", MIXES)
def test_every_block_linear_gets_the_type_llama_cpp_writes(written_types, shape_name, mix):
    types, config = written_types[shape_name, mix]
    shape = ModelShape.of(config)
    in_features = {"self_attn.o_proj": config.num_attention_heads * config.head_dim,
                   "mlp.down_proj": config.intermediate_size}
    wrong = {}
    for layer in range(config.num_hidden_layers):
        for linear, role in ROLES.items():
            ours = linear_type(mix, linear, layer, in_features.get(linear, config.hidden_size), shape)
            theirs = types[f"blk.{layer}.{role}.weight"]
            if ours != theirs:
                wrong[f"blk.{layer}.{role}"] = (ours, theirs)
    assert not wrong, f"{len(wrong)} tensors differ (ours, llama.cpp's): {dict(list(wrong.items())[:6])}"


def test_the_mixes_move_tensors_and_aliases_name_the_m_mixes():
    shape = ModelShape(layers=16, gqa=4)
    assert {linear_type("Q4_K_M", "mlp.down_proj", layer, 512, shape) for layer in range(16)} == {"Q4_K", "Q6_K"}
    assert linear_type("Q4_K", "self_attn.v_proj", 0, 256, shape) == linear_type("Q4_K_M", "self_attn.v_proj", 0, 256, shape)
    assert linear_type("Q3_K_S", "self_attn.q_proj", 3, 576, shape) == "Q4_0"  # 576 = 2.25 blocks of 256
    assert linear_type("Q4_K_S", "self_attn.q_proj", 3, 40, shape) == "F16"  # not even 32 divides it
    assert check_file_type("q4_k_m") == "Q4_K_M" and "Q6_K" in FILE_TYPE_DEFAULTS
    with pytest.raises(ConfigError, match="one of: Q4_0"):
        check_file_type("Q4_K_XL")
