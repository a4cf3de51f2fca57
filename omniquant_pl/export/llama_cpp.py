"""llama.cpp's own quantizer (through llama-cpp-python), with its log captured.

`quantize_gguf` runs ``llama_model_quantize`` with a file type (``Q4_0``, ``Q3_K_M``, ...): llama.cpp
picks each tensor's type by its own rules (e.g. the output / tied embedding in Q6_K or Q8_0, K-quant
fallbacks for rows that are not a multiple of 256) and copies tensors already in the chosen type
unchanged, which is how an exact export keeps the run's blocks while the embeddings and head get
llama.cpp's defaults.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

from omniquant_pl.errors import ConfigError, OmniQuantError

ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise OmniQuantError('GGUF export and llama.cpp scoring need llama-cpp-python: pip install -e ".[export]"') from err
    return llama_cpp


def file_types() -> dict[str, int]:
    """llama.cpp's file types by quantize name (Q4_0, Q4_K_M, F16, ...) plus the aliases Q3_K/Q4_K/Q5_K."""
    llama_cpp = require_llama_cpp()
    prefix = "LLAMA_FTYPE_MOSTLY_"
    types = {name[len(prefix):]: getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(prefix)}
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    types.update({alias: types[target] for alias, target in ALIASES.items() if target in types})
    return types


def file_type(name: str) -> int:
    types = file_types()
    if name not in types:
        raise ConfigError(f"unknown GGUF type '{name}'; llama.cpp makes: {', '.join(sorted(types))}")
    return types[name]


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines during the context (not printed); restores the package's logger."""
    llama_cpp = require_llama_cpp()
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_gguf(source: Path, destination: Path, type_name: str, allow_requantize: bool = False) -> list[str]:
    """llama.cpp quantizes `source` into `destination` as file type `type_name`; returns its log."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(type_name)
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    with captured_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if status != 0:
        tail = " | ".join(line.strip() for line in lines[-3:] if line.strip())
        raise OmniQuantError(f"llama.cpp could not quantize to {type_name} (status {status}): {tail}")
    return lines
