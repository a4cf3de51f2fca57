"""`model.streaming`: whether a run streams its blocks, and the streamed load itself.

A streamed model is built from its config with every parameter on the meta device (buffers such as
rotary tables are real), then only the tensors outside the blocks (embeddings, final norm, lm_head)
are read from the shards. Blocks are read one at a time later (streaming/blocks.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from omniquant_pl.config import ModelConfig
from omniquant_pl.errors import ConfigError
from omniquant_pl.streaming.shards import NotStreamable, ShardFolder, weight_bytes

log = logging.getLogger(__name__)

# model.streaming auto streams when the weights on disk take more than this share of the RAM available now
AUTO_RAM_SHARE = 0.5
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors' floating-point dtypes
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]


def available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def model_folder(config: ModelConfig) -> Path:
    """The local folder of the model's files: the folder given, or the hub snapshot (downloaded the
    way from_pretrained would, safetensors only)."""
    from omniquant_pl.models import check_model_location

    path = check_model_location(config)
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=HUB_FILES))


def refuse_or_fall_back(choice: bool | str, reason: str) -> None:
    """``on``: a one-line ConfigError; ``auto``: a log line (the caller loads the whole model)."""
    if choice is True:
        raise ConfigError(f"model.streaming on: {reason}; streaming reads *.safetensors shards whose tensor names "
                          "match the model's parameters: use model.streaming: off (a full load)")
    log.info("model.streaming auto: %s; loading the whole model instead", reason)


def exceeds_ram_share(size: int, share: float | None = None) -> bool:
    """Whether `size` bytes of weights take more than `share` (AUTO_RAM_SHARE) of the available RAM."""
    share = AUTO_RAM_SHARE if share is None else share
    ram = available_ram()
    if size <= share * ram:
        return False
    log.info("model.streaming auto: the weights (%.2f GiB) exceed %.0f%% of the available RAM (%.2f GiB)",
             size / 2**30, 100 * share, ram / 2**30)
    return True


def streaming_source(config: ModelConfig, share: float | None = None) -> ShardFolder | None:
    """The shards to stream from, or None for a full load (``off``; ``auto`` with weights that fit
    in `share` of the available RAM, or that cannot be streamed). ``on`` refuses what cannot stream."""
    from omniquant_pl.models import check_model_location

    choice = config.streaming
    if choice is False:
        return None
    if config.gguf_file:  # auto: a log line only where streaming would have been chosen
        local = Path(check_model_location(config)).expanduser()
        if choice is True or (local.is_dir() and exceeds_ram_share(weight_bytes(local, config.gguf_file), share)):
            refuse_or_fall_back(choice, f"model.gguf_file '{config.gguf_file}' is a GGUF file, which transformers "
                                        "de-quantizes as a whole")
        return None
    folder = model_folder(config)
    if choice == "auto" and not exceeds_ram_share(weight_bytes(folder), share):
        return None
    try:
        return ShardFolder(folder)
    except NotStreamable as err:
        return refuse_or_fall_back(choice, str(err))


def check_streaming(config: ModelConfig, model: nn.Module | None) -> None:
    """Before the model loads: ``model.streaming on`` has a model folder of safetensors weights to
    stream from (and no loaded `model` was handed over instead)."""
    if config.streaming is not True:
        return
    if model is not None:
        raise ConfigError("model.streaming on reads the model block by block from its folder, but calibrate() was "
                          "given a loaded model; pass no model (model.name_or_path: its folder) or use "
                          "model.streaming: off")
    streaming_source(config)


def check_streaming_names(config: ModelConfig, skeleton: nn.Module) -> None:
    """Before the model loads: with ``model.streaming on``, the checkpoint holds the parameters of
    `skeleton` (the weightless model) under their own names."""
    if config.streaming is not True:
        return
    try:
        check_names(skeleton, streaming_source(config))
    except NotStreamable as err:
        refuse_or_fall_back(True, str(err))


def return_freed_memory_promptly() -> None:
    """glibc raises its mmap threshold after the first large free and then serves block-sized tensors
    from a heap that fragments (the host memory of a streamed run then grows block after block): fix
    the threshold at 1 MiB, so every large tensor is its own mapping, returned when freed. No-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def blocks_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The state-dict prefix of the block list (``model.layers.``)."""
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def fill(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put `tensors` (state-dict names of `module`) in place of its parameters/buffers, each cast
    to the dtype of the one it replaces (floating point only: what from_pretrained does)."""
    current = module.state_dict(keep_vars=True)
    state = {name: t.to(current[name].dtype) if t.is_floating_point() and current[name].is_floating_point() else t
             for name, t in tensors.items()}
    module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Every parameter of `module` back on the meta device (buffers stay: they are small and some
    are not in the checkpoint)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                     requires_grad=param.requires_grad)


def tied_names(model: nn.Module) -> set[str]:
    """Parameters transformers ties to another one (lm_head.weight to the embeddings): not in checkpoints."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def check_names(model: nn.Module, shards: ShardFolder) -> None:
    """The checkpoint holds every parameter under the model's own name (transformers 5 converts
    some checkpoints' names on load, e.g. mixtures of experts' per-expert tensors), unquantized."""
    if getattr(model.config, "quantization_config", None):
        raise NotStreamable("the checkpoint is quantized (quantization_config), transformers de-quantizes it on load")
    tied = tied_names(model)
    missing = [name for name, _ in model.named_parameters(remove_duplicate=False)
               if name not in shards.weight_map and name not in tied]
    if missing:
        raise NotStreamable(f"{len(missing)} of the model's parameters (first: {missing[0]}) are not in the "
                            "checkpoint under their own names (transformers converts its names on load)")
    dtypes = shards.tensor_dtypes()  # every shard's header, checked
    parameters = dict(model.named_parameters(remove_duplicate=False))
    not_float = [name for name, dtype in dtypes.items() if name in parameters and dtype not in FLOAT_DTYPES]
    if not_float:
        raise ConfigError(f"the checkpoint stores {not_float[0]} as {dtypes[not_float[0]]}, not a floating-point type "
                          f"({len(not_float)} such tensors); it is damaged or quantized in a way transformers would "
                          "convert: download the original weights again")


def load_streamed_model(config: ModelConfig, shards: ShardFolder, device: torch.device) -> tuple[nn.Module, object]:
    """The model with its blocks' parameters on the meta device and everything else loaded
    (CPU, eval mode, use_cache off: as models.load_model_and_tokenizer leaves it), and its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from omniquant_pl.arch.registry import get_arch, get_blocks
    from omniquant_pl.models import resolve_dtype

    folder, remote = shards.folder, config.trust_remote_code
    dtype = resolve_dtype(config.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": remote}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=remote), **kwargs)
    check_names(model, shards)
    return_freed_memory_promptly()
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if plan:
        raise NotStreamable(f"transformers keeps {', '.join(sorted(plan))} in float32 for this model")
    prefix = blocks_prefix(model, get_blocks(model, get_arch(model)))
    names = set(model.state_dict())
    fill(model, shards.read([n for n in shards.weight_map if n in names and not n.startswith(prefix)]))
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if left:
        raise NotStreamable(f"{', '.join(left[:3])} stayed unloaded (not in the checkpoint, not tied)")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    log.info("loaded %s for streaming (%s, %s): %d blocks stay on disk until used", config.name_or_path,
             model.config.model_type, dtype, len(get_blocks(model, get_arch(model))))
    return model, tokenizer


def load_model(config: ModelConfig, device: torch.device, full_load) -> tuple[nn.Module, object, ShardFolder | None]:
    """(model, tokenizer, shards): a streamed model with its shards, or `full_load(config, device)`'s
    (models.load_model_and_tokenizer) with None."""
    shards = streaming_source(config)
    if shards is not None:
        try:
            return (*load_streamed_model(config, shards, device), shards)
        except NotStreamable as err:
            refuse_or_fall_back(config.streaming, str(err))
    return (*full_load(config, device), None)
