"""Checks before the model loads: what a run can get wrong that needs the model's
config.json, the file system or the machine, but not the weights. Each fails in one line (or warns).

The model's shapes come from a weightless skeleton built on the meta device from its config, so the
architecture table and every quantized linear's input size are checked without loading anything.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from omniquant_pl.config import ACCELERATORS, EvalConfig, ModelConfig, QuantConfig, RunConfig
from omniquant_pl.distributed import Processes
from omniquant_pl.errors import ConfigError
from omniquant_pl.io import check_writable_dir
from omniquant_pl.streaming.load import check_streaming, check_streaming_names

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
EXPECTED = "expected a Hugging Face causal LM folder (config.json, *.safetensors weights, tokenizer files)"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions")


def check_run(config: RunConfig, model: nn.Module | None = None) -> None:
    """Everything `calibrate` refuses before it loads the model (or, given `model`, before it runs)."""
    check_accelerator(config.train.accelerator, "train.accelerator")
    processes = Processes.from_env()  # torchrun's processes: the global batch must split over them
    processes.local_batch_size(config.train.batch_size, config.calib.nsamples)
    if processes.is_rank_zero:  # data-parallel runs: rank 0 alone writes
        check_writable_dir(config.output_dir, "output_dir", run_folder=True)
    check_streaming(config.model, model)
    skeleton = model if model is not None else model_skeleton(config.model)
    if skeleton is not None:
        check_quantizable(skeleton, config.quant)
        check_rotation(skeleton, config)
        if model is None:
            check_attention_backend(skeleton, config)
        seqlens = {"calib.seqlen": config.calib.seqlen}
        if config.eval.datasets:
            seqlens["eval.seqlen"] = config.eval.seqlen
        check_context(skeleton.config, seqlens)
        if model is None:
            check_streaming_names(config.model, skeleton)
    check_text_source(config.calib.source, "calib.source", "calib")
    for dataset in config.eval.datasets:
        check_text_source(dataset, "eval.datasets", "eval")
    warn_about(config)


def check_evaluation(model: ModelConfig, eval_config: EvalConfig, accelerator: str) -> None:
    """Everything `evaluate` refuses before it loads the model."""
    check_accelerator(accelerator, "--accelerator")
    config = model_config(model)
    if config is not None and eval_config.datasets:
        check_context(config, {"eval.seqlen": eval_config.seqlen})
    for dataset in eval_config.datasets:
        check_text_source(dataset, "eval.datasets", "eval")
    if eval_config.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"eval.tasks {list(eval_config.tasks)} need lm-evaluation-harness, which is not installed: "
                          "pip install -e \".[eval]\" (or leave out --eval.tasks)")


# -- the model ---------------------------------------------------------------------------------
def model_config(model: ModelConfig):
    """The model's transformers config, read without its weights (None for a hub id that cannot be
    reached now: loading it reports why). A local folder that holds no causal LM is refused."""
    from transformers import AutoConfig

    from omniquant_pl.models import check_model_location

    path = check_model_location(model)
    folder = Path(path).expanduser()
    if folder.is_file():
        hint = f"--model.name_or_path {folder.parent} --model.gguf_file {folder.name}" if folder.suffix == ".gguf" \
            else f"--model.name_or_path {folder.parent}"
        raise ConfigError(f"model.name_or_path '{model.name_or_path}' is a file; give its folder: {hint}")
    local = folder.is_dir() and not model.gguf_file
    names = sorted(p.name for p in folder.iterdir()) if local else []
    if local and "config.json" not in names:
        _refuse_folder_without_config(folder, names)
    kwargs = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as err:
        if folder.is_dir():
            raise ConfigError(f"model folder '{folder}': {str(err).splitlines()[0]}; {EXPECTED}") from None
        return None
    except ValueError as err:
        if local and not model.trust_remote_code and "auto_map" in (folder / "config.json").read_text(errors="replace"):
            raise ConfigError(f"model '{model.name_or_path}' is a custom architecture whose code ships with it "
                              "(config.json has auto_map); if you trust that code, add --model.trust_remote_code true"
                              ) from None
        raise ConfigError(f"model '{model.name_or_path}': {str(err).splitlines()[0]}; {EXPECTED}") from None
    check_causal_lm(config, model)
    if local:
        _check_model_files(folder, names)
    return config


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _refuse_folder_without_config(folder: Path, names: list[str]) -> None:
    if not names:
        raise ConfigError(f"model folder '{folder}' is empty; {EXPECTED}")
    ggufs = [name for name in names if name.endswith(".gguf")]
    hint = f"; for its GGUF file add --model.gguf_file {ggufs[0]}" if ggufs else ""
    raise ConfigError(f"model folder '{folder}' has no config.json (found: {_shown(names)}); {EXPECTED}{hint}")


def _check_model_files(folder: Path, names: list[str]) -> None:
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise ConfigError(f"model folder '{folder}' has config.json but no weights (*.safetensors or *.bin; "
                          f"found: {_shown(names)}); {EXPECTED}")
    if not any(name in TOKENIZER_FILES for name in names):
        raise ConfigError(f"model folder '{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}; "
                          f"found: {_shown(names)}); save the model's tokenizer there (tokenizer.save_pretrained)")


def check_causal_lm(config, model: ModelConfig) -> None:
    """A config that transformers builds as a causal LM (or remote code that says it is one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from omniquant_pl.arch.registry import supported_model_types

    remote = model.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ConfigError(
            f"model '{model.name_or_path}' holds a '{config.model_type}' model ({type(config).__name__}), not a causal "
            "language model; give a causal LM (OmniQuant calibrates any, weight-only; with LET and activation "
            f"quantization: {', '.join(supported_model_types())})"
        )


def model_skeleton(model: ModelConfig) -> nn.Module | None:
    """The model built from its config on the meta device (no memory, no weights); None where the
    config cannot be read now or transformers cannot build it that way (checked after loading)."""
    from transformers import AutoModelForCausalLM

    config = model_config(model)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - remote code and exotic configs: the same checks run after loading
        log.info("shape checks wait for the model to load (a weightless %s could not be built: %s)",
                 config.model_type, str(err).splitlines()[0][:120])
        return None


def check_quantizable(model: nn.Module, quant: QuantConfig) -> None:
    """A supported architecture whose blocks have the adapter's linears (and, for LET or activation
    quantization, a table entry), and a group size that divides every quantized linear's input features."""
    from omniquant_pl.arch.registry import check_supported, get_arch, get_blocks
    from omniquant_pl.quant.lwc import suggest_group_size

    spec = get_arch(model)
    check_supported(spec, quant.let, quant.abits)
    in_features: dict[int, list[str]] = {}
    for index, block in enumerate(get_blocks(model, spec)):
        spec.check_block(block, index)
        for name in spec.linear_names:
            in_features.setdefault(block.get_submodule(name).in_features, []).append(name.rpartition(".")[2])
    if quant.gguf_type is not None:
        check_gguf_types(model, spec, quant)
        return
    group = quant.group_size
    if group and any(size % group for size in in_features):
        listed = "; ".join(f"{size}: {', '.join(dict.fromkeys(names))}" for size, names in sorted(in_features.items()))
        suggestion = suggest_group_size(group, list(in_features))
        use = (f"use {suggestion} (the largest power of two <= {group} that divides them all) or 0 for per-channel"
               if suggestion else "use 0 (per channel): no power of two of at least 8 divides them all")
        raise ConfigError(f"quant.group_size {group} does not divide the input features of every quantized "
                          f"linear ({listed}); {use}")


def check_rotation(skeleton: nn.Module, config: RunConfig) -> None:
    """quant.rotate: exact for this family and its sizes, on a model held in memory."""
    kind = config.quant.rotate
    if kind == "none":
        return
    if config.model.streaming is True:
        raise ConfigError(f"quant.rotate {kind} rewrites the embeddings and every block before calibration, which "
                          "model.streaming on cannot (its blocks stay on disk); use model.streaming: off")
    from omniquant_pl.arch import get_arch
    from omniquant_pl.rotate import check_rotatable

    check_rotatable(get_arch(skeleton), skeleton, kind, config.quant.rotate_online)


def check_attention_backend(skeleton: nn.Module, config: RunConfig) -> None:
    """Activation quantization of a model that calls torch SDPA itself (attention_hook "sdpa",
    Falcon) quantizes q/k/v in that call, so the model must load with the sdpa attention."""
    from omniquant_pl.arch.registry import get_arch

    wanted = config.model.attn_implementation
    if config.quant.abits < 16 and get_arch(skeleton).attention_hook == "sdpa" and wanted not in (None, "sdpa"):
        raise ConfigError(
            f"quant.abits {config.quant.abits} on a {skeleton.config.model_type} model quantizes q/k/v inside its "
            f"torch SDPA call, but model.attn_implementation is '{wanted}'; use --model.attn_implementation sdpa "
            "(or leave it unset)"
        )


def context_length(config) -> int | None:
    """The longest sequence the model's positions cover (None where the config does not say)."""
    return next((value for key in CONTEXT_KEYS if isinstance(value := getattr(config, key, None), int)), None)


def check_context(config, seqlens: dict[str, int]) -> None:
    """Windows no longer than the model's context (the paper's protocol never exceeds it)."""
    limit = context_length(config)
    for option, seqlen in seqlens.items():
        if limit and seqlen > limit:
            raise ConfigError(f"{option} {seqlen} exceeds the model's context of {limit} tokens (its config's "
                              f"max_position_embeddings); use {option} <= {limit} (the paper uses 2048)")


# -- data, machine, settings -------------------------------------------------------------------
def check_text_source(source: str, option: str, split: str) -> None:
    """A known source name, or a local file that reads as text (read now: it is small next to a model)."""
    from omniquant_pl.calib.data import NAMED_SOURCES, load_text

    if source in NAMED_SOURCES:
        return
    try:
        load_text(source, split)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def check_accelerator(accelerator: str, option: str) -> None:
    """A known accelerator, and a GPU where one is asked for."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"{option} must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ConfigError(f"{option} {accelerator}: no CUDA GPU is visible to torch {torch.__version__} ({build}); "
                          f"use {option} cpu (or auto: the GPU when there is one)")


def check_gguf_types(model: nn.Module, spec, quant: QuantConfig) -> None:
    """A run with quant.gguf_type: a family whose tensors llama.cpp's type rules name, and a grid here for
    the type of every linear (llama.cpp stores a row that even 32 does not divide in F16)."""
    from omniquant_pl.arch.registry import get_blocks
    from omniquant_pl.quant.gguf_mix import ROLES, ModelShape
    from omniquant_pl.quant.grids import linear_grid

    missing = [name for name in spec.linear_names if name not in ROLES]
    if missing or spec.experts is not None:
        raise ConfigError(f"quant.gguf_type follows llama.cpp's type rules for LLaMA-family blocks ({', '.join(ROLES)}); "
                          f"this {spec.name} model has {', '.join(missing) or 'experts'}: calibrate with quant.wbits/"
                          "group_size instead")
    shape = ModelShape.of(model.config)
    for index, block in enumerate(get_blocks(model, spec)):
        for name in spec.linear_names:
            linear_grid(quant, name, index, block.get_submodule(name).in_features, shape)


def warn_about(config: RunConfig) -> None:
    """Settings that run but are unlikely to be what was meant."""
    from omniquant_pl.checkpoint import read_checkpoint_state
    from omniquant_pl.export.gguf_blocks import warn_if_no_exact_gguf_type

    quant = config.quant
    warn_if_no_exact_gguf_type(quant)
    if quant.abits < 8 and not quant.let:
        log.warning("%s without LET (quant.let false): activation outliers stay unsmoothed and the paper's "
                    "W%dA%d results need LET; add --quant.let true (the shipped w4a4.yaml configs also set "
                    "quant.let_alpha 0.75 and train.let_lr 1e-3)", quant.tag, quant.wbits, quant.abits)
    if config.resume and read_checkpoint_state(Path(config.output_dir)) is None:
        log.warning("--resume true, but %s holds no checkpoint (no checkpoint.json): starting a fresh run",
                    config.output_dir)
