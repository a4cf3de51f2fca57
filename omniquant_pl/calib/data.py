"""Text sources (paper sets, offline text, local files), token caching and window sampling.

A source name resolves to (text, description) for a split: ``calib`` or ``eval``. WikiText-2
looks for a local copy first (``$OMNIQUANT_DATA_DIR``, then ``../shared/data`` beside the working
directory), then the hub through ``datasets``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from omniquant_pl.errors import ConfigError, OmniQuantError
from omniquant_pl.io import atomic_save_torch

log = logging.getLogger(__name__)

Split = str  # "calib" or "eval"
LOCAL_FILE_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".json")


@dataclass(frozen=True)
class TextSource:
    text: str
    description: str  # recorded in results.json: where the text came from
    max_windows: int = 0  # evaluation protocol's cap on windows (c4_new: 256), 0 = none
    # Sources whose windows are drawn document by document (the paper's C4): the documents, the
    # number of windows and the seed; `text` is then empty.
    documents: tuple[str, ...] = ()
    document_windows: int = 0
    document_seed: int = 0


def _data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("OMNIQUANT_DATA_DIR"):
        dirs.append(Path(os.environ["OMNIQUANT_DATA_DIR"]))
    dirs += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return dirs


def _data_dir_name(data_dir: Path) -> str:
    """How results name a data folder: no machine-specific absolute path."""
    if os.environ.get("OMNIQUANT_DATA_DIR") and data_dir == Path(os.environ["OMNIQUANT_DATA_DIR"]):
        return "$OMNIQUANT_DATA_DIR"
    return "../shared/data"


def _hub(loader: Callable[[], str], name: str) -> str:
    try:
        return loader()
    except ImportError as err:
        raise OmniQuantError(f"source '{name}' needs the 'datasets' package: pip install datasets") from err
    except Exception as err:  # network/hub failures surface as many exception types
        raise OmniQuantError(
            f"could not fetch '{name}' from the hub ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            "use a local file (calib.source: path/to/text.txt) or the offline source 'pydoc'"
        ) from err


def _wikitext2(split: Split) -> TextSource:
    local_name = "wiki.valid.tokens" if split == "calib" else "wiki.test.raw"
    for data_dir in _data_dirs():
        path = data_dir / "wikitext2" / local_name
        if path.is_file():
            # the protocol reads the test text as plain utf-8; the calibration file starts with a BOM
            text = path.read_text(encoding="utf-8-sig" if split == "calib" else "utf-8")
            return TextSource(text, f"wikitext2 {split}: local {_data_dir_name(data_dir)}/wikitext2/{local_name}")

    def load() -> str:
        from datasets import load_dataset

        hf_split = "train" if split == "calib" else "test"
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        # the rows are the raw file's lines (each ending in "\n", blank lines as ""): joined with ""
        # they are the raw text itself, as the local path reads it (the official code joins them
        # with "\n\n", which adds blank lines between all of them)
        return "".join(rows["text"])

    hf_split = "train" if split == "calib" else "test"
    return TextSource(_hub(load, "wikitext2"), f"wikitext2 {split}: hub wikitext-2-raw-v1 {hf_split}, raw text")


# C4 (allenai/c4 on the hub). `c4` is the paper's protocol (the official code's `get_c4`):
# calibration windows from random training documents, evaluation on 256 random windows of seqlen
# tokens from the validation shard (seed 0), each from a random document at least that long.
# `c4_new` is the official code's other loader: the first 1100 validation documents joined with
# " ", tokenized, and the first 256 windows.
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0


def _c4_documents(split: Split) -> list[str]:
    from datasets import load_dataset

    if split == "calib":
        return load_dataset("allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train")["text"]
    return load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation")["text"]


def _c4(split: Split) -> TextSource:
    documents = tuple(_hub(lambda: _c4_documents(split), "c4"))
    if split == "calib":  # windows per document, seeded by calib.seed (see calibration_windows)
        return TextSource("", f"c4 calib: hub allenai/c4 {C4_TRAIN_SHARD}, one random window per random document "
                          "(paper protocol)", documents=documents)
    return TextSource("", f"c4 eval: hub allenai/c4 {C4_VALIDATION_SHARD}, {C4_EVAL_WINDOWS} random windows "
                      f"from documents at least one window long, seed {C4_EVAL_SEED} (paper protocol)",
                      documents=documents, document_windows=C4_EVAL_WINDOWS, document_seed=C4_EVAL_SEED)


def _c4_new(split: Split) -> TextSource:
    def load() -> str:
        documents = _c4_documents(split)
        return "\n\n".join(documents[:20000]) if split == "calib" else " ".join(documents[:C4_EVAL_DOCS])

    if split == "calib":
        return TextSource(_hub(load, "c4_new"), f"c4_new calib: hub allenai/c4 {C4_TRAIN_SHARD}, first 20000 documents")
    return TextSource(_hub(load, "c4_new"), f"c4_new eval: hub allenai/c4 {C4_VALIDATION_SHARD}, first "
                      f"{C4_EVAL_DOCS} documents joined, first {C4_EVAL_WINDOWS} windows", max_windows=C4_EVAL_WINDOWS)


def sample_document_windows(tokenizer, documents: tuple[str, ...], count: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` windows of `seqlen` tokens, each from a random document long enough, drawn as the
    official code draws them (random.seed(seed); a document index until one has enough tokens,
    then a start). A document of exactly `seqlen` tokens is passed over (the official code would
    fail on it: its start is drawn from an empty range)."""
    rng = random.Random(seed)
    windows = []
    for _ in range(count):
        for _attempt in range(10_000):  # C4: about 1 in 20 validation documents has 2048+ tokens
            ids = tokenizer(documents[rng.randint(0, len(documents) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > seqlen:
                break
        else:
            raise ConfigError(f"no document of the text source with more than {seqlen} tokens in 10000 draws; "
                              "use a smaller seqlen")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)  # (count, seqlen)


def document_windows_cached(tokenizer, source: TextSource, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """sample_document_windows, cached on disk like tokenize_cached."""
    digest = hashlib.sha256()
    for document in source.documents:
        digest.update(document.encode("utf-8") + b"\0")
    digest.update(f"{tokenizer_fingerprint(tokenizer)} {count} {seqlen} {seed}".encode())
    return _cached(_cache_dir() / "windows" / f"{digest.hexdigest()[:24]}.pt",
                   lambda: sample_document_windows(tokenizer, source.documents, count, seqlen, seed))


def _ptb(split: Split) -> TextSource:
    """The official code's `get_ptb`: sentences joined with "\n\n", evaluated on the validation split."""
    hf_split = "train" if split == "calib" else "validation"

    def load() -> str:
        from datasets import load_dataset

        return "\n\n".join(load_dataset("ptb_text_only", "penn_treebank", split=hf_split)["sentence"])

    return TextSource(_hub(load, "ptb"), f"ptb {split}: hub ptb_text_only {hf_split}, joined with blank lines")


def _ptb_new(split: Split) -> TextSource:
    """The official code's `get_ptb_new`: sentences joined with " ", evaluated on the test split."""
    hf_split = "train" if split == "calib" else "test"

    def load() -> str:
        from datasets import load_dataset

        return " ".join(load_dataset("ptb_text_only", "penn_treebank", split=hf_split)["sentence"])

    return TextSource(_hub(load, "ptb_new"), f"ptb_new {split}: hub ptb_text_only {hf_split}, joined with spaces")


def _pydoc(split: Split) -> TextSource:
    """CPython's bundled documentation topics: real English text, always available offline.
    The first 80% of topics (sorted by name) calibrate, the rest evaluate."""
    from pydoc_data import topics

    names = sorted(topics.topics)
    cut = int(len(names) * 0.8)
    chosen = names[:cut] if split == "calib" else names[cut:]
    text = "\n\n".join(topics.topics[name] for name in chosen)
    return TextSource(text, f"pydoc {split}: CPython pydoc_data topics ({len(chosen)} of {len(names)})")


def _local_file(path_str: str, split: Split) -> TextSource:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ConfigError(f"text file '{path_str}' not found; give an existing .txt/.raw/.jsonl path")
    if path.suffix in (".jsonl", ".json"):
        text = _jsonl_text(path, _read_text(path, "utf-8"))
    else:
        text = _read_text(path, "utf-8-sig")
    return TextSource(text, f"file {path.resolve()} ({split})")


TEXT_FILE_HINT = 'give a UTF-8 text file (.txt/.raw/.tokens) or a .jsonl file with one {"text": "..."} object per line'


def _read_text(path: Path, encoding: str) -> str:
    """A text file's content; a binary file is refused in one line."""
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(f"text file '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}); {TEXT_FILE_HINT}") from None
    if "\0" in text:
        raise ConfigError(f"text file '{path}' is not text (it holds NUL bytes); {TEXT_FILE_HINT}")
    return text


def _jsonl_text(path: Path, content: str) -> str:
    """The "text" fields of a JSON Lines file's rows, joined by blank lines."""
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"'{path}' line {number} is not JSON ({err.msg}); {TEXT_FILE_HINT}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            found = f"keys {', '.join(list(row)[:6])}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ConfigError(f"'{path}' line {number} has no string 'text' field (found {found}); {TEXT_FILE_HINT}")
        texts.append(row["text"])
    return "\n\n".join(texts)


NAMED_SOURCES: dict[str, Callable[[Split], TextSource]] = {
    "wikitext2": _wikitext2,
    "c4": _c4,
    "c4_new": _c4_new,
    "ptb": _ptb,
    "ptb_new": _ptb_new,
    "pydoc": _pydoc,
}


def load_text(source: str, split: Split) -> TextSource:
    """Text of `source` for the calibration or evaluation split."""
    if source in NAMED_SOURCES:
        return NAMED_SOURCES[source](split)
    if source.startswith("file:") or source.endswith(LOCAL_FILE_SUFFIXES) or "/" in source:
        return _local_file(source.removeprefix("file:"), split)
    raise ConfigError(
        f"unknown text source '{source}': use one of {', '.join(NAMED_SOURCES)} or a path to a "
        f"{'/'.join(LOCAL_FILE_SUFFIXES)} file"
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("OMNIQUANT_CACHE", Path.home() / ".cache" / "omniquant_pl"))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: the fast tokenizer's full definition
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor) or a slow one's whole
    vocabulary, plus its class and special-token settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {
        "class": type(tokenizer).__name__,
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "size": len(tokenizer),
    }
    payload = definition + "\0" + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenize_cached(tokenizer, source: TextSource) -> torch.Tensor:
    """1-D token ids of the whole text (``tokenizer(text).input_ids``), cached on disk under the
    text and the tokenizer's full fingerprint."""
    key = hashlib.sha256(
        (source.text + "\0" + tokenizer_fingerprint(tokenizer)).encode("utf-8")
    ).hexdigest()[:24]
    return _cached(_cache_dir() / "tokens" / f"{key}.pt", lambda: tokenizer(source.text, return_tensors="pt").input_ids[0])


def _cached(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor cached at `path`, else `compute()` stored there when possible: a damaged entry is
    rebuilt, and an unwritable cache folder costs speed, never the run."""
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry (any unpickling error) is rebuilt
            path.unlink(missing_ok=True)
    value = compute()
    try:
        atomic_save_torch(value, path)
    except OSError as err:
        log.warning("token cache %s is not writable (%s); continuing without it (set OMNIQUANT_CACHE to a "
                    "writable folder)", path.parent, err.strerror or err)
    return value


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, exactly as the paper's loader draws them."""
    if ids.numel() <= seqlen + 1:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than calib.seqlen={seqlen} + 2; "
            "use a longer text or a smaller seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])  # (nsamples, seqlen)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    text = load_text(source, "calib")
    if text.documents:
        return document_windows_cached(tokenizer, text, nsamples, seqlen, seed), text.description
    return sample_windows(tokenize_cached(tokenizer, text), nsamples, seqlen, seed), text.description
