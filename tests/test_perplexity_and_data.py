"""Perplexity protocol, text sources and the calibration window sampler."""
from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import requires_shared_data, tiny_llama, tiny_opt

from omniquant_pl.calib.data import load_text, sample_windows, tokenize_cached
from omniquant_pl.errors import ConfigError
from omniquant_pl.eval.perplexity import evaluate_perplexity, perplexity_on_source


@pytest.mark.parametrize("builder", [tiny_llama, tiny_opt])
def test_perplexity_matches_a_direct_transformers_loop(builder):
    model = builder()
    ids = torch.randint(0, 384, (1000,), generator=torch.Generator().manual_seed(0))
    seqlen = 96
    ppl, windows = evaluate_perplexity(model, ids, seqlen=seqlen, batch_size=4)
    assert windows == 1000 // seqlen  # tail dropped
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            loss = model(input_ids=window, labels=window).loss  # mean over seqlen - 1 predictions
            nlls.append(loss.float() * seqlen)
    reference = math.exp(torch.stack(nlls).sum().item() / (windows * seqlen))
    assert ppl == pytest.approx(reference, rel=1e-5)
    first_two, n = evaluate_perplexity(model, ids, seqlen=seqlen, max_windows=2)
    assert n == 2 and first_two != pytest.approx(ppl, rel=1e-9)


def test_window_sampler_follows_the_protocol():
    ids = torch.arange(5000)
    windows = sample_windows(ids, nsamples=5, seqlen=100, seed=2)
    rng = random.Random(2)
    for window in windows:
        start = rng.randint(0, 5000 - 100 - 1)
        assert torch.equal(window, torch.arange(start, start + 100))
    with pytest.raises(ConfigError, match="fewer than calib.seqlen"):
        sample_windows(torch.arange(50), 1, 100, 0)


def test_text_sources(tmp_path, tokenizer):
    calib, held_out = load_text("pydoc", "calib"), load_text("pydoc", "eval")
    assert len(calib.text) > 200_000 and len(held_out.text) > 20_000
    assert held_out.text[:200] not in calib.text
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first doc"}\n{"text": "second doc"}\n')
    assert load_text(str(jsonl), "calib").text == "first doc\n\nsecond doc"
    with pytest.raises(ConfigError, match="unknown text source 'wikitext3'"):
        load_text("wikitext3", "calib")
    with pytest.raises(ConfigError, match="not found"):
        load_text(str(tmp_path / "missing.txt"), "calib")
    ids = tokenize_cached(tokenizer, calib)
    assert torch.equal(tokenize_cached(tokenizer, calib), ids)  # second call from the cache


@requires_shared_data()
def test_local_wikitext2_is_found(tokenizer):
    test = load_text("wikitext2", "eval")
    assert test.description == "wikitext2 eval: local ../shared/data/wikitext2/wiki.test.raw"  # no absolute path
    assert test.text.startswith(" = Robert Boulter = \n")
    assert not load_text("wikitext2", "calib").text.startswith("\ufeff")  # BOM stripped


def test_batched_windows_give_the_same_perplexity():
    model = tiny_llama()
    ids = torch.randint(0, 384, (64 * 7 + 5,), generator=torch.Generator().manual_seed(1))
    one, n = evaluate_perplexity(model, ids, seqlen=64, batch_size=1)
    for batch_size in (3, 7, 16):  # a ragged last batch, exactly all windows, more than all windows
        batched, m = evaluate_perplexity(model, ids, seqlen=64, batch_size=batch_size)
        assert m == n == 7
        assert batched == pytest.approx(one, rel=1e-5)


def _fake_c4(monkeypatch, docs):
    import datasets

    calls = []

    def fake_load_dataset(path, data_files=None, split=None, **kwargs):
        calls.append((path, data_files, split))
        return datasets.Dataset.from_dict({"text": docs, "timestamp": ["t"] * len(docs)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def _official_c4_eval_windows(tokenizer, docs, seqlen):
    """The official code's get_c4 validation loop, as the reference (seed 0, 256 windows)."""
    import random

    random.seed(0)
    windows = []
    for _ in range(256):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i], return_tensors="pt").input_ids
            if ids.shape[1] >= seqlen:
                break
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, i : i + seqlen])
    return torch.hstack(windows)[0]


def test_c4_evaluation_follows_the_paper_protocol(monkeypatch, tmp_path, tokenizer):
    """`c4`: validation shard 00000-of-00008, 256 windows drawn document by document (seed 0) exactly as
    the official get_c4; `c4_new`: the first 1100 documents joined with ' ', first 256 windows."""
    from omniquant_pl.calib import data

    monkeypatch.setenv("OMNIQUANT_CACHE", str(tmp_path))
    # short documents (never long enough) between long ones: rejection sampling matters
    docs = [f"document {i} says the value of item {i} is {i * 7} units." * (1 + 3 * (i % 3 == 0)) for i in range(1200)]
    calls = _fake_c4(monkeypatch, docs)
    source = data.load_text("c4", "eval")
    assert calls == [("allenai/c4", {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")]
    assert source.documents == tuple(docs) and source.document_windows == 256 and "paper protocol" in source.description
    seqlen = 40
    assert sum(tokenizer(d, return_tensors="pt").input_ids.shape[1] > seqlen for d in docs) < len(docs)
    reference = _official_c4_eval_windows(tokenizer, docs, seqlen)
    model = tiny_llama()
    result = perplexity_on_source(model, tokenizer, "c4", seqlen=seqlen, batch_size=64)
    expected, _ = evaluate_perplexity(model, reference, seqlen=seqlen, batch_size=64)
    assert result["windows"] == 256 and result["ppl"] == pytest.approx(expected, rel=1e-6)
    assert "paper protocol" in result["source"]
    assert perplexity_on_source(model, tokenizer, "c4", seqlen=seqlen, max_windows=5)["windows"] == 5

    joined = data.load_text("c4_new", "eval")
    assert joined.text == " ".join(docs[:1100]) and joined.max_windows == 256 and not joined.documents
    ids = tokenize_cached(tokenizer, joined)
    short = 8
    assert ids.numel() // short > 256  # the cap, not the text length, decides the window count
    result = perplexity_on_source(model, tokenizer, "c4_new", seqlen=short, batch_size=64)
    expected, _ = evaluate_perplexity(model, ids[: 256 * short], seqlen=short, batch_size=64)
    assert result["windows"] == 256 and result["ppl"] == pytest.approx(expected, rel=1e-6)


def test_c4_calibration_draws_one_window_per_random_training_document(monkeypatch, tmp_path, tokenizer):
    from omniquant_pl.calib import data

    monkeypatch.setenv("OMNIQUANT_CACHE", str(tmp_path))
    docs = [("word " * (5 + 30 * (i % 2))) + str(i) for i in range(50)]
    calls = _fake_c4(monkeypatch, docs)
    windows, description = data.calibration_windows(tokenizer, "c4", nsamples=6, seqlen=16, seed=2)
    assert calls[0] == ("allenai/c4", {"train": "en/c4-train.00000-of-01024.json.gz"}, "train")
    assert windows.shape == (6, 16) and "paper protocol" in description
    import random

    rng, expected = random.Random(2), []
    for _ in range(6):
        while True:
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > 16:
                break
        start = rng.randint(0, ids.numel() - 16 - 1)
        expected.append(ids[start : start + 16])
    assert torch.equal(windows, torch.stack(expected))
    with pytest.raises(ConfigError, match="no document of the text source with more than 4096 tokens"):
        data.sample_document_windows(tokenizer, tuple(docs), 1, 4096, 0)


def test_token_cache_tells_apart_tokenizers_with_the_same_vocabulary(tmp_path, monkeypatch, tokenizer):
    """Two tokenizers with one vocabulary but another normalizer give other ids: the cache must not mix them."""
    import copy

    from tokenizers import normalizers

    from omniquant_pl.calib.data import TextSource, tokenizer_fingerprint

    monkeypatch.setenv("OMNIQUANT_CACHE", str(tmp_path))
    lowercasing = copy.deepcopy(tokenizer)
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lowercasing.get_vocab() == tokenizer.get_vocab()
    assert tokenizer_fingerprint(lowercasing) != tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == tokenizer_fingerprint(tokenizer)
    source = TextSource("The Python Language Reference DEFINES Syntax", "test")
    plain_ids = tokenize_cached(tokenizer, source)
    lower_ids = tokenize_cached(lowercasing, source)
    assert torch.equal(lower_ids, lowercasing(source.text, return_tensors="pt").input_ids[0])
    assert not torch.equal(plain_ids, lower_ids)


@requires_shared_data()
def test_wikitext2_from_the_hub_is_the_same_text_as_the_local_raw_file(monkeypatch):
    """One WikiText-2 text for both paths: the hub's rows (the raw file's lines, blank ones as '')
    joined with '' are the raw text the local path reads whole."""
    import datasets

    from omniquant_pl.calib import data

    local = data.load_text("wikitext2", "eval").text
    rows = []
    for line in local.splitlines(keepends=True):
        rows += [line, ""]  # the hub keeps blank lines as empty rows

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        assert (path, name, split) == ("wikitext", "wikitext-2-raw-v1", "test")
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_data_dirs", list)
    hub = data.load_text("wikitext2", "eval")
    assert hub.text == local and "hub" in hub.description


def test_ptb_follows_the_official_loaders(monkeypatch):
    import datasets

    from omniquant_pl.calib import data

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append(split)
        return datasets.Dataset.from_dict({"sentence": [f"{split} one", f"{split} two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.load_text("ptb", "eval").text == "validation one\n\nvalidation two"
    assert data.load_text("ptb_new", "eval").text == "test one test two"
    assert data.load_text("ptb", "calib").text == "train one\n\ntrain two"
