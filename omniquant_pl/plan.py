"""The run plan: every ``auto`` and every default that depends on the machine or the model,
resolved once into one typed object.

`plan_run` is called once per run, as soon as the model object exists (its dtype and width decide
the precision and where the calibration caches live); everything it reads from the config is
checked earlier, before the model loads (preflight.py). The plan is printed at the start of the
run and saved in results.json; the rest of the code reads the plan, never the ``auto`` values.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from omniquant_pl.config import RunConfig
from omniquant_pl.distributed import Processes

log = logging.getLogger(__name__)

# calibration caches alive at once during a block: inputs of both chains, targets, next inputs
# (+ the aug targets with train.aug_loss); auto keeps them on the GPU when they fit in half its free memory
LIVE_CACHES, LIVE_CACHES_AUG = 4, 5


def resolve_device(accelerator: str) -> torch.device:
    """train.accelerator / --accelerator: ``auto`` = a CUDA GPU if there is one, else the CPU."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device, model_dtype: torch.dtype) -> str:
    """``auto``: mixed precision in the model's half dtype on GPU, full fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "32-true"
    return "16-mixed" if model_dtype == torch.float16 else "bf16-mixed"


def overflow_safe_precision(precision: str, abits: int, bf16_supported: bool) -> str:
    """fp16 AMP overflows on the large activations that >= 8-bit activation quantization keeps (a
    known failure of the official code): bf16 where supported, else full fp32."""
    if precision in ("16-mixed", "16-true") and 8 <= abits < 16:
        return "bf16-mixed" if bf16_supported else "32-true"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def resolve_compile(choice: str, device: torch.device) -> str:
    """train.compile: ``auto`` = ``block`` on CUDA, ``off`` elsewhere."""
    if choice == "auto":
        return "block" if device.type == "cuda" else "off"
    return choice


def resolve_cuda_graph(choice: bool | str, device: torch.device, precision: str, compile_mode: str,
                       distributed: bool) -> bool:
    """train.cuda_graph: a graph needs CUDA and no fp16 loss scaling, and cannot hold DDP's gradient
    all-reduce; ``auto`` = on with the compiled step."""
    possible = device.type == "cuda" and precision != "16-mixed" and not distributed
    return possible and (compile_mode == "block" if choice == "auto" else bool(choice))


def resolve_cache_device(choice: str, device: torch.device, cache_bytes: int, aug_loss: bool,
                         free_bytes: int | None = None) -> torch.device:
    """train.cache_device: ``auto`` = the accelerator unless the live caches would take over half of
    its free memory (then pinned host memory)."""
    if device.type != "cuda" or choice == "accelerator":
        return device
    if choice == "cpu":
        return torch.device("cpu")
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    live = LIVE_CACHES_AUG if aug_loss else LIVE_CACHES
    if live * cache_bytes <= free // 2:
        return device
    log.info("calibration caches (%d x %.2f GiB) go to pinned host memory: the GPU has %.1f GiB free",
             live, cache_bytes / 2**30, free / 2**30)
    return torch.device("cpu")


def resolve_keep_best_rtn(choice: bool | str, let: bool) -> bool:
    """train.keep_best_rtn: ``auto`` = RTN is a keep_best candidate where the block learns LET (RTN is
    then the only candidate with the identity transform), not for LWC alone."""
    return let if choice == "auto" else bool(choice)


@dataclass(frozen=True)
class RunPlan:
    """What this run does where the config left the choice to the machine or the model."""

    device: str  # torch device of the blocks ("cuda", "cuda:1", "cpu")
    precision: str  # Lightning precision of every block's Trainer
    model_dtype: str  # the loaded model's dtype (blocks go back to it after fusing)
    block_dtype: str  # the dtype a block calibrates in (fp32 under 32-true)
    cache_dtype: str  # the calibration caches' dtype
    cache_device: str  # where the calibration caches live
    compile: str  # block | quantizers | off
    cuda_graph: bool
    keep_best_rtn: bool
    shuffle_seed: int  # batch order seed (train.shuffle_seed, else calib.seed)
    processes: int  # torchrun processes (1 without torchrun)
    local_batch_size: int  # windows per step on this process
    streaming: bool  # blocks read from and written to disk one at a time
    notes: tuple[str, ...] = field(default=())  # what the resolution changed from what was asked

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> RunPlan:
        return cls(**{**data, "notes": tuple(data.get("notes", ()))})

    def summary(self) -> str:
        """One line for the start of a run's log."""
        parts = [f"device {self.device}", f"precision {self.precision}", f"blocks in {self.block_dtype}",
                 f"caches on {self.cache_device}", f"compile {self.compile}",
                 f"cuda graph {'on' if self.cuda_graph else 'off'}", f"batch {self.local_batch_size} per process"
                 + (f" x {self.processes}" if self.processes > 1 else ""),
                 f"keep_best rtn {'on' if self.keep_best_rtn else 'off'}"]
        if self.streaming:
            parts.append("streaming")
        return "plan: " + ", ".join(parts)


def plan_run(config: RunConfig, processes: Processes, model_dtype: torch.dtype, hidden_size: int,
             streaming: bool, free_accelerator_bytes: int | None = None) -> RunPlan:
    """Resolve the run's ``auto`` choices for this machine and this model (see RunPlan)."""
    train, quant = config.train, config.quant
    notes: list[str] = []
    device = processes.device(resolve_device(train.accelerator))
    precision = resolve_precision(train.precision, device, model_dtype)
    bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    safe = overflow_safe_precision(precision, quant.abits, bf16_supported)
    if safe != precision:
        notes.append(f"precision {precision} overflows with {quant.abits}-bit activations; using {safe}")
        precision = safe
    compile_mode = resolve_compile(train.compile, device)
    cuda_graph = resolve_cuda_graph(train.cuda_graph, device, precision, compile_mode, processes.is_distributed)
    if train.cuda_graph is True and not cuda_graph:
        notes.append("train.cuda_graph needs one CUDA process and bf16/fp32 precision (here "
                     f"{device.type}, {precision}, {processes.world_size} processes); running the plain step")
    block_dtype = torch.float32 if precision == "32-true" else model_dtype
    cache_dtype = block_dtype if device.type == "cuda" else torch.float32
    local_batch_size = processes.local_batch_size(train.batch_size, config.calib.nsamples)
    local_windows = config.calib.nsamples // processes.world_size
    cache_bytes = local_windows * config.calib.seqlen * hidden_size * torch.empty((), dtype=cache_dtype).element_size()
    cache_device = resolve_cache_device(train.cache_device, device, cache_bytes, train.aug_loss,
                                        free_accelerator_bytes)
    plan = RunPlan(
        device=str(device), precision=precision, model_dtype=_name(model_dtype), block_dtype=_name(block_dtype),
        cache_dtype=_name(cache_dtype), cache_device=str(cache_device), compile=compile_mode, cuda_graph=cuda_graph,
        keep_best_rtn=resolve_keep_best_rtn(train.keep_best_rtn, quant.let),
        shuffle_seed=config.calib.seed if train.shuffle_seed is None else train.shuffle_seed,
        processes=processes.world_size, local_batch_size=local_batch_size, streaming=streaming, notes=tuple(notes),
    )
    for note in plan.notes:
        log.warning(note)
    log.info(plan.summary())
    return plan


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a plan names (``float32``, ``bfloat16``, ...)."""
    return getattr(torch, name)
