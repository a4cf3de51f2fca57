"""BlockSequencer: quantize a model block by block, one Lightning Trainer per block.

For block i: cache the FP block's outputs on the FP-chain inputs (targets), build the block's
LightningModule on the quantized-chain inputs, fit, fuse (a callback), propagate the quantized
block's outputs to block i+1, move the block back to CPU and checkpoint. Only one block and the
activation caches live on the accelerator.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from omniquant_pl.arch.attention_hooks import ATTENTION_NAME, use_quantized_attention
from omniquant_pl.arch.registry import check_supported, get_arch, get_blocks, warn_if_weight_only
from omniquant_pl.block_module import BlockModule, cached_batch_loader
from omniquant_pl.calib.capture import capture_block_inputs, kwargs_to, run_block
from omniquant_pl.calib.data import calibration_windows
from omniquant_pl.calib.prefetch import on_device
from omniquant_pl.checkpoint import block_state, existing_progress, load_checkpoint, write_checkpoint, write_learned
from omniquant_pl.config import RunConfig
from omniquant_pl.distributed import (
    Processes,
    barrier,
    broadcast_from_rank_zero,
    differs_from_rank_zero,
    global_ranges,
    global_sum,
    init_process_group,
    quiet_other_ranks,
    trainer_placement,
)
from omniquant_pl.errors import NonFiniteLossError, OmniQuantError
from omniquant_pl.export.gguf_blocks import warn_if_no_exact_gguf_type
from omniquant_pl.hooks import CalibrationCallback
from omniquant_pl.io import atomic_write_json, atomic_write_text
from omniquant_pl.keep_best import keep_best
from omniquant_pl.let.init import input_ranges
from omniquant_pl.models import load_model_and_tokenizer
from omniquant_pl.quant.codes import save_block_codes
from omniquant_pl.quant.experts import expert_token_counts
from omniquant_pl.quant.kernels import use_fused_quantizers
from omniquant_pl.quant.rtn import rtn_quantizer
from omniquant_pl.streaming.blocks import StreamedBlocks
from omniquant_pl.streaming.load import load_model
from omniquant_pl.versions import changed_versions, software_versions

log = logging.getLogger(__name__)


def resolve_device(accelerator: str) -> torch.device:
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
    known failure of the official code): switch to bf16 where supported, else full fp32."""
    if precision in ("16-mixed", "16-true") and 8 <= abits < 16:
        return "bf16-mixed" if bf16_supported else "32-true"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def quiet_lightning() -> None:
    """One Trainer per block would repeat Lightning's start-up banners 30+ times: keep warnings only."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # blocks calibrate in eval mode
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # caches are in memory
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def default_callbacks() -> list[Callback]:
    from callbacks.fuse import FuseCallback
    from callbacks.perplexity import PerplexityCallback
    from callbacks.plot import LossPlotCallback
    from callbacks.progress import ProgressCallback

    return [FuseCallback(), PerplexityCallback(), ProgressCallback(), LossPlotCallback()]


class BlockSequencer:
    """Drives the whole calibration. `callbacks` add to (or, by class, replace) the defaults."""

    def __init__(
        self,
        config: RunConfig,
        callbacks: list[Callback] | None = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.config = config
        user = list(callbacks or [])
        replaced = {type(cb) for cb in user}
        self.callbacks = [cb for cb in default_callbacks() if type(cb) not in replaced] + user
        self.processes = Processes.from_env()  # torchrun's processes (one without torchrun)
        # windows per step on this process (train.batch_size is the global batch): refused before the
        # model loads when it cannot be split over the processes
        self.local_batch_size = self.processes.local_batch_size(config.train.batch_size, config.calib.nsamples)
        self.output_dir = Path(config.output_dir)
        self.device = self.processes.device(resolve_device(config.train.accelerator))
        self.model, self.tokenizer = model, tokenizer
        self.streamed: StreamedBlocks | None = None  # model.streaming: the blocks stay on disk until used
        self.results: dict[str, Any] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _calibration_callbacks(self) -> list[CalibrationCallback]:
        return [cb for cb in self.callbacks if isinstance(cb, CalibrationCallback)]

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self._calibration_callbacks():
            if self.processes.is_rank_zero or not cb.rank_zero_only:
                getattr(cb, hook)(self, *args)

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's files: rank 0 of a data-parallel run, or the only one."""
        return self.processes.is_rank_zero

    def _new_cache(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty calibration cache (pinned when it is on the host and the blocks run on a GPU,
        so batch copies are asynchronous)."""
        pin = device.type == "cpu" and self.device.type == "cuda"
        return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)

    @property
    def block_kwargs(self) -> dict[str, Any]:
        """Block 0's keyword arguments (each block's: layer_kwargs)."""
        return self.layer_kwargs[0]

    @block_kwargs.setter
    def block_kwargs(self, kwargs: dict[str, Any]) -> None:
        """The same keyword arguments for every block (a model with one layer type)."""
        self.layer_kwargs = [kwargs] * len(self.blocks)

    @torch.no_grad()
    def _propagate(self, block: nn.Module, inputs: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Block `index`'s outputs for all cached inputs, in batches, in the training precision."""
        outputs = self._new_cache(inputs.shape, inputs.dtype, inputs.device)
        step = max(self.local_batch_size, 4)
        dtype = autocast_dtype(self.precision)
        starts = range(0, inputs.shape[0], step)
        batches = on_device(((inputs[start : start + step],) for start in starts), self.device)
        for start, (batch,) in zip(starts, batches):
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                out = run_block(block, batch, self.layer_kwargs[index])
            outputs[start : start + step].copy_(out, non_blocking=True)
        if outputs.device != self.device and self.device.type == "cuda":
            torch.cuda.synchronize()  # the host-side cache is complete before anyone reads it
        return outputs

    def _cache_device(self, cache_bytes: int) -> torch.device:
        """Accelerator unless told otherwise or the caches (up to 5 live at once: inputs of both
        chains, targets, aug targets, next inputs) would take over half of its free memory."""
        choice = self.config.train.cache_device
        if self.device.type != "cuda" or choice == "accelerator":
            return self.device
        if choice == "cpu":
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        live = 5 if self.config.train.aug_loss else 4
        if live * cache_bytes <= free // 2:
            return self.device
        log.info("calibration caches (%d x %.2f GiB) go to pinned host memory: the GPU has %.1f GiB free",
                 live, cache_bytes / 2**30, free / 2**30)
        return torch.device("cpu")

    def cache_inputs(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Block-0 inputs as a calibration cache on the cache device (pinned if on the host)."""
        cache_device = self._cache_device(hidden.numel() * torch.empty((), dtype=dtype).element_size())
        cache = self._new_cache(hidden.shape, dtype, cache_device)
        cache.copy_(hidden)
        return cache

    def cuda_graph_possible(self) -> bool:
        """A CUDA graph can record the step: a CUDA device and no fp16 loss scaling."""
        return self.device.type == "cuda" and self.precision != "16-mixed"

    def cuda_graph_enabled(self) -> bool:
        """train.cuda_graph with ``auto`` resolved: on with the compiled step on CUDA."""
        choice = self.config.train.cuda_graph
        if self.processes.is_distributed:  # a recorded graph cannot hold DDP's gradient all-reduce
            return False
        if choice == "auto":
            return self.cuda_graph_possible() and self.compile_mode() == "block"
        return bool(choice) and self.cuda_graph_possible()

    def block_dtype(self) -> torch.dtype:
        """The dtype a block calibrates in: fp32 under 32-true (a half-precision model's block is
        upcast for its turn and cast back after fusing), else the model's own."""
        return torch.float32 if self.precision == "32-true" else self.model_dtype

    @property
    def shuffle_seed(self) -> int:
        """Seed of the batch order (train.shuffle_seed, else calib.seed)."""
        train = self.config.train
        return self.config.calib.seed if train.shuffle_seed is None else train.shuffle_seed

    def compile_mode(self) -> str:
        """train.compile with ``auto`` resolved: ``block`` on CUDA, ``off`` elsewhere."""
        choice = self.config.train.compile
        if choice == "auto":
            return "block" if self.device.type == "cuda" else "off"
        return choice

    def _check_shapes(self) -> None:
        """Fail before any work if a quantizer cannot be built for the model's linears."""
        block = self.blocks[0]
        self.spec.check_block(block)
        for name in self.spec.linear_names:
            rtn_quantizer(block.get_submodule(name).weight, self.config.quant)

    def _make_logger(self, index: int):
        kind = self.config.train.logger
        if kind == "none":
            return False
        if kind == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(self.output_dir, name="logs", version=f"block_{index:03d}")
        return CSVLogger(self.output_dir, name="logs", version=f"block_{index:03d}")

    def _make_trainer(self, index: int, batches_per_epoch: int) -> L.Trainer:
        train = self.config.train
        return L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            # one device, or Lightning's DDP strategy over torchrun's processes (experts that
            # receive no tokens on a process leave their parameters without a gradient there)
            **trainer_placement(self.processes, self.device, find_unused_parameters=self.spec.experts is not None),
            precision=self.precision,
            max_epochs=train.epochs,
            logger=self._make_logger(index),
            callbacks=list(self.callbacks),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=batches_per_epoch,  # Lightning batches (chunks of steps): once per epoch
        )

    # -- the run -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        quiet_lightning()
        warn_if_no_exact_gguf_type(cfg.quant)
        shards = None
        if self.model is None:
            self.model, self.tokenizer, shards = load_model(cfg.model, self.device, load_model_and_tokenizer)
        self.model.eval()
        self.spec = get_arch(self.model)
        check_supported(self.spec, cfg.quant.let, cfg.quant.abits)
        self.blocks = get_blocks(self.model, self.spec)
        if shards is not None:
            self.streamed = StreamedBlocks(self.model, self.blocks, shards, self.output_dir, self.writes_files)
        warn_if_weight_only(self.spec, len(self.blocks))
        self._check_shapes()
        self.model_dtype = next(self.model.parameters()).dtype
        self.precision = resolve_precision(cfg.train.precision, self.device, self.model_dtype)
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        safe = overflow_safe_precision(self.precision, cfg.quant.abits, bf16_ok)
        if safe != self.precision:
            log.warning("precision %s overflows with %d-bit activations; using %s", self.precision, cfg.quant.abits, safe)
            self.precision = safe
        if cfg.train.cuda_graph is True and not self.cuda_graph_possible():
            log.warning("train.cuda_graph needs a CUDA device and bf16/fp32 precision (here %s, %s); "
                        "running the plain step", self.device.type, self.precision)
        if self.processes.is_distributed and cfg.train.cuda_graph is not False and self.cuda_graph_possible():
            log.info("train.cuda_graph is off in data-parallel runs (a recorded graph cannot hold the gradient "
                     "all-reduce); running the plain step")
        if cfg.quant.abits < 16:
            use_quantized_attention(self.model)
        if self.writes_files:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def _fresh_results(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "quant_tag": self.config.quant.tag,
            "model_type": self.model.config.model_type,
            "device": str(self.device),
            "precision": self.precision,
            "versions": software_versions(),  # the stack that calibrated the blocks
            "blocks": [],
            "perplexity": {},
        }

    def _read_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The output_dir's checkpoint, read (or refused: damaged, other config, no --resume) before
        the model loads."""
        if self.config.resume:
            return load_checkpoint(self.output_dir, self.config)
        progress = existing_progress(self.output_dir)
        if progress:
            raise OmniQuantError(
                f"{self.output_dir} already holds a checkpoint with {progress} "
                "finished blocks; add --resume true to continue it, or choose another output_dir"
            )
        return None

    def _restore_or_start(self, restored: tuple[dict, dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
        """Results and learned parameters of finished blocks (empty for a fresh run)."""
        if restored is not None:
            self.results, learned = restored
            finished = len(self.results["blocks"])
            self.results["resumed_at_block"] = finished
            log.info("resuming %s at block %d", self.output_dir, finished)
            changed = changed_versions(self.results.get("versions"))
            if changed:  # the blocks of one run come from two stacks: say so, and record it
                log.warning("resuming with other software than the finished blocks used (%s); the blocks from %d "
                            "on are calibrated with it", ", ".join(changed), finished)
                self.results.setdefault("resumed_with_versions", []).append(
                    {"at_block": finished, "versions": software_versions()})
            return learned
        self.results = self._fresh_results()
        return {}

    def _check_calibration_ids(self, windows: torch.Tensor, source: str) -> None:
        """Record the calibration token ids' hash; a resumed run must see the same ids (the text
        found, e.g. through a relative path, and the tokenizer both decide them)."""
        digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]
        recorded = self.results.get("calibration_ids_sha256")
        if recorded is not None and recorded != digest:
            raise OmniQuantError(
                f"cannot resume {self.output_dir}: this run's calibration token ids differ from the checkpoint's "
                f"(text now {source!r}, was {self.results.get('calibration_source')!r}): the calibration text or "
                "the tokenizer changed; use the original ones, or a new output_dir"
            )
        self.results["calibration_source"] = source
        self.results["calibration_ids_sha256"] = digest

    def run(self) -> dict[str, Any]:
        """Calibrate every block. Under torchrun every process runs this, each on its shard of the
        windows; rank 0 alone writes files and evaluates, and every process returns rank 0's results."""
        quiet_other_ranks(self.processes)
        init_process_group(self.processes, self.device)
        results = self._run()
        barrier()  # rank 0's files (results, the saved model) are complete before any process exits
        self.results = broadcast_from_rank_zero(results)
        return self.results

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        started = time.perf_counter()
        restored = self._read_checkpoint()
        self.setup()
        learned = self._restore_or_start(restored)
        finished = len(self.results["blocks"])
        self.results["streaming"] = self.streamed is not None  # model.streaming: blocks read from disk one at a time
        self.results["processes"] = self.processes.world_size
        if self.writes_files:
            atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.output_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._emit("on_calibration_start")
        barrier()  # while rank 0 evaluates the baselines

        windows, source = calibration_windows(
            self.tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed
        )
        self._check_calibration_ids(windows, source)
        if differs_from_rank_zero((finished, self.results["calibration_ids_sha256"])):
            raise OmniQuantError(
                f"the processes disagree with rank 0 on the run in {self.output_dir} (finished blocks or calibration "
                "token ids): give every node the same output_dir (a shared file system), model and calibration text"
            )
        # this process's windows: its part of every global batch
        captured = capture_block_inputs(self.model, self.spec, self.processes.shard(windows, cfg.train.batch_size))
        cache_dtype = self.block_dtype() if self.device.type == "cuda" else torch.float32
        moved: dict[int, torch.Tensor] = {}  # blocks of one layer type share their mask and rotary tables
        self.layer_kwargs = [kwargs_to(kwargs, self.device, self.block_dtype(), moved)
                             for kwargs in captured.layer_kwargs]
        fp_inputs = self.cache_inputs(captured.hidden_states, cache_dtype)  # (N, T, hidden)
        self.results["cache_device"] = str(fp_inputs.device)
        quant_inputs = fp_inputs
        del captured

        calib_started = time.perf_counter()
        self.results["compile"] = self.compile_mode()
        with use_fused_quantizers(self.compile_mode() == "quantizers"):
            for index in range(len(self.blocks)):
                if index < finished:  # rebuild the inputs of the first unfinished block
                    fp_inputs, quant_inputs = self._replay_block(index, fp_inputs, quant_inputs, learned)
                    continue
                fp_inputs, quant_inputs, metrics, state = self.calibrate_block(index, fp_inputs, quant_inputs)
                learned.update({f"layers.{index}.{k}": v for k, v in state.items()})
                self.results["blocks"].append(metrics)
                if self.writes_files:
                    write_checkpoint(self.output_dir, cfg, self.results, index, state)
                    atomic_write_json(self.results, self.output_dir / "results.json")
                self._emit("on_block_end", index, metrics)
        del fp_inputs, quant_inputs
        if self.writes_files:
            write_learned(self.output_dir, cfg, learned)

        self.results["calibration_seconds"] = sum(b["seconds"] for b in self.results["blocks"])
        self.results["session_seconds"] = time.perf_counter() - calib_started
        if self.device.type == "cuda":
            self.results["peak_accelerator_memory_bytes"] = torch.cuda.max_memory_allocated()
        self.results["peak_host_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._emit("on_calibration_end", self.results)
        if not self.writes_files:
            return self.results
        atomic_write_json(self.results, self.output_dir / "results.json")  # the evaluation is kept even if saving fails
        if cfg.save_model:
            self.save_model()
        elif self.streamed is not None:
            self.streamed.discard()
        self.results["total_seconds"] = time.perf_counter() - started
        atomic_write_json(self.results, self.output_dir / "results.json")
        return self.results

    def _load_block(self, index: int) -> nn.Module:
        """Block `index` (streaming: its weights read from the input shards first)."""
        return self.streamed.load_original(index) if self.streamed is not None else self.blocks[index]

    def _finish_block(self, index: int) -> None:
        """Streaming: write finished block `index` (fused, on the CPU) to the output model's shards and
        put its weights back on the meta device."""
        if self.streamed is not None:
            self.streamed.finish(index)

    def _build_module(self, index: int, block: nn.Module, ranges: dict | None = None) -> BlockModule:
        cfg = self.config
        return BlockModule(block, index, self.spec, self.layer_kwargs[index], cfg.quant, cfg.train, ranges).to(self.device)

    def _replay_block(
        self, index: int, fp_inputs: torch.Tensor, quant_inputs: torch.Tensor, learned: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-apply a finished block's learned parameters (no training) and propagate both chains."""
        block = self._load_block(index).to(self.device, self.block_dtype())
        targets = self._propagate(block, fp_inputs, index)
        del fp_inputs
        module = self._build_module(index, block)
        try:
            module.load_learned_state(block_state(learned, index))
            module.fuse()
        except BaseException:
            self.blocks[index] = module.abandon().to("cpu", self.model_dtype)
            raise
        # the codes of this replay: the model saved at the end comes from the same fuse
        if self.writes_files:
            save_block_codes(self.output_dir, index, module.quantized_weights)
        next_quant_inputs = self._propagate(block, quant_inputs, index)
        self.blocks[index] = block.to("cpu", self.model_dtype)
        self._finish_block(index)
        return targets, next_quant_inputs

    def calibrate_block(
        self, index: int, fp_inputs: torch.Tensor, quant_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        cfg, started = self.config, time.perf_counter()
        torch.manual_seed(cfg.calib.seed * 100_003 + index)
        block = self._load_block(index).to(self.device, self.block_dtype())
        module = None
        try:
            names = self.spec.input_range_names if cfg.quant.let else ()
            # LET init statistics and (mixtures of experts) tokens per expert, from the targets pass
            with input_ranges(block, names) as ranges, expert_token_counts(block, self.spec.experts) as tokens:
                targets = self._propagate(block, fp_inputs, index)
            del fp_inputs
            global_ranges(ranges)  # over every process's windows (data-parallel runs)
            tokens = global_sum(tokens)
            aug_targets = self._propagate(block, quant_inputs, index) if cfg.train.aug_loss else None
            module = self._build_module(index, block, ranges if cfg.quant.let else None)
            module.expert_tokens = tokens
            return self._train_block(index, block, module, quant_inputs, targets, aug_targets, started)
        except BaseException:  # the caller's model stays whole: original linears, no hooks, on the CPU
            self.blocks[index] = (module.abandon() if module is not None else block).to("cpu", self.model_dtype)
            raise

    def _train_block(
        self, index: int, block: nn.Module, module: BlockModule, quant_inputs: torch.Tensor, targets: torch.Tensor,
        aug_targets: torch.Tensor | None, started: float,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        """Train, fuse and propagate one block whose BlockModule is built."""
        cfg = self.config
        caches = [quant_inputs, targets] + ([aug_targets] if aug_targets is not None else [])
        loader = cached_batch_loader(*caches, batch_size=self.local_batch_size, shuffle=cfg.train.shuffle,
                                     seed=self.shuffle_seed + index, steps_per_call=cfg.train.steps_per_call)
        # no-grad loss passes (RTN/initial/final) in larger batches
        eval_loader = cached_batch_loader(*caches, batch_size=max(self.local_batch_size, 8), shuffle=False, seed=0)
        metrics: dict[str, Any] = {"block": index}
        amp = autocast_dtype(self.precision)
        if self.compile_mode() == "block" and cfg.train.epochs > 0:
            metrics["compiled_step"] = module.warm_up(loader.dataset[0], amp)
        if self.cuda_graph_enabled():
            module.enable_cuda_graph(amp)
        if cfg.train.report_losses:
            with module.plain_rtn():
                metrics["rtn_loss"] = module.mean_loss(eval_loader, amp)
            metrics["init_loss"] = module.mean_loss(eval_loader, amp)

        initial_state = module.learned_state()
        self._emit("on_block_start", index, module)
        if cfg.train.epochs > 0 and (module.lwc_parameters() or module.let_parameters()):
            self._fit_with_retries(index, module, loader, initial_state, metrics)
            module.to(self.device)  # Lightning's teardown leaves a GPU module on the CPU
            if module.use_cuda_graph:
                metrics["cuda_graph_step"] = module.graphed
        metrics["epoch_losses"] = module.epoch_losses
        if module.expert_tokens:
            self._report_expert_tokens(index, module, initial_state, metrics)
        if cfg.train.report_losses:
            metrics["final_loss"] = module.mean_loss(eval_loader, amp)
            if cfg.train.keep_best:
                keep_best(index, module, initial_state, metrics, rtn=cfg.train.keep_best_rtn)
        learned_state = module.learned_state()
        self._emit("on_block_fit_end", index, module)
        if module.quant_linears:
            raise RuntimeError(
                f"block {index} was not fused: keep callbacks.fuse.FuseCallback (or a replacement "
                "that calls module.fuse()) among the callbacks"
            )
        if self.writes_files:
            save_block_codes(self.output_dir, index, module.quantized_weights)  # before the checkpoint counts it
        next_quant_inputs = self._propagate(block, quant_inputs, index)
        del module, loader, eval_loader, caches, aug_targets, quant_inputs
        self.blocks[index] = block.to("cpu", self.model_dtype)
        self._finish_block(index)
        metrics["seconds"] = time.perf_counter() - started
        return targets, next_quant_inputs, metrics, learned_state

    @staticmethod
    def _report_expert_tokens(index: int, module: BlockModule, initial_state: dict[str, torch.Tensor],
                              metrics: dict[str, Any]) -> None:
        """Record the calibration tokens each expert received; an expert that received none keeps its
        initial clipping (its RTN/initial grid), and the run says so."""
        metrics["expert_tokens"] = list(module.expert_tokens)
        log.info("block %d: calibration tokens per expert %s", index, module.expert_tokens)
        unrouted = module.keep_initial_clipping_of_unrouted(initial_state)
        if unrouted:
            log.warning("block %d: experts %s received no calibration tokens; their weights keep the initial clipping "
                        "(no gradient reached them); more or longer calibration samples would route tokens to them",
                        index, unrouted)

    def _fit_with_retries(self, index, module, loader, initial_state, metrics, attempts: int = 3) -> None:
        """Fit; on a non-finite loss restore the initial parameters and retry at half the lr."""
        for attempt in range(attempts):
            module.epoch_losses = []
            self._make_trainer(index, len(loader)).fit(module, train_dataloaders=loader)
            if all(math.isfinite(loss) for loss in module.epoch_losses):
                return
            module.load_learned_state(initial_state)
            module.lr_scale *= 0.5
            metrics.setdefault("nonfinite_retries", []).append(
                {"attempt": attempt + 1, "epoch_losses": module.epoch_losses, "next_lr_scale": module.lr_scale}
            )
            log.warning("block %d: non-finite loss; restored the initial parameters, retrying at lr x%.3g",
                        index, module.lr_scale)
        raise NonFiniteLossError(
            f"block {index}: the loss stayed non-finite after {attempts} attempts (lr down to x{module.lr_scale:.3g}); "
            "use train.precision: 32-true, or lower train.lwc_lr / train.let_lr. Finished blocks are saved; "
            "resume with --resume true"
        )

    def save_model(self) -> Path:
        """Save the fused fake-quant model (plain transformers modules) and its tokenizer."""
        path = self.output_dir / "model"
        self.model.config.use_cache = True
        quant = self.config.quant
        self.model.config.omniquant = {
            "method": "omniquant-" + "+".join(m for m, on in (("lwc", quant.lwc), ("let", quant.let)) if on),
            "wbits": quant.wbits,
            "abits": quant.abits,
            "group_size": quant.group_size,
            "symmetric": quant.symmetric,
            "grid": quant.grid,
            "fake_quant": True,
            # weights hold the fake-quantized values; when abits < 16 the inputs of every linear
            # and q/k/v of attention are quantized per token (asymmetric, dynamic) at inference
            "activations": None if quant.abits >= 16 else {
                "bits": quant.abits, "granularity": "per-token", "symmetric": False, "dynamic": True,
                "targets": ["linear inputs", "attention q/k/v"],
            },
        }
        attention = self.model.config._attn_implementation
        if attention == ATTENTION_NAME:  # save a config that plain transformers loads
            self.model.set_attn_implementation("sdpa")
        # written beside model/ and renamed into place when complete: a full disk never leaves a
        # model/ without weights behind
        # (streaming: the folder that already holds the finished blocks' shards)
        staging = (self.streamed.staging if self.streamed is not None
                   else Path(tempfile.mkdtemp(prefix=".model.", dir=self.output_dir)))
        try:
            if self.streamed is not None:
                self.streamed.save_rest()
            else:
                self.model.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if attention == ATTENTION_NAME:
                self.model.set_attn_implementation(ATTENTION_NAME)
        self.results["saved_model"] = str(path)
        return path
