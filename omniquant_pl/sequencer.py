"""BlockSequencer: quantize a model block by block, one Lightning Trainer per block.

For block i: cache the FP block's outputs on the FP-chain inputs (targets), build the block's
LightningModule on the quantized-chain inputs, fit, fuse (a callback), propagate the quantized
block's outputs to block i+1, move the block back to CPU and checkpoint. Only one block and the
activation caches live on the accelerator. Policies live in plan.py, trainer.py and resume.py."""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch import nn

from omniquant_pl import distributed
from omniquant_pl.arch.registry import get_arch, get_blocks
from omniquant_pl.block_module import BlockModule, report_unrouted_experts
from omniquant_pl.calib.batches import cached_batch_loader
from omniquant_pl.calib.caches import cache_of, propagate
from omniquant_pl.calib.capture import capture_block_inputs, kwargs_to
from omniquant_pl.calib.data import calibration_windows
from omniquant_pl.callback import CalibrationCallback
from omniquant_pl.checkpoint import block_state, write_checkpoint, write_learned
from omniquant_pl.compile_policy import CompilePolicy, active_policy
from omniquant_pl.config import RunConfig
from omniquant_pl.distributed import Processes
from omniquant_pl.errors import OmniQuantError
from omniquant_pl.io import atomic_write_json, atomic_write_text
from omniquant_pl.keep_best import keep_best
from omniquant_pl.let.init import input_ranges
from omniquant_pl.models import load_model_and_tokenizer
from omniquant_pl.plan import RunPlan, autocast_dtype, dtype_of, plan_run, resolve_device
from omniquant_pl.quant.activation_hooks import use_quantized_attention
from omniquant_pl.quant.codes import save_block_codes
from omniquant_pl.quant.experts import expert_token_counts
from omniquant_pl.quant.gguf_mix import ModelShape
from omniquant_pl.quant.init_search import input_power
from omniquant_pl.quant.rtn import check_quantizable
from omniquant_pl.results import BlockResult, RunResults
from omniquant_pl.resume import check_calibration_ids, results_so_far, start_or_resume
from omniquant_pl.rotate import rotate_for_run
from omniquant_pl.saved_model import save_model
from omniquant_pl.streaming.blocks import StreamedBlocks
from omniquant_pl.streaming.load import load_model
from omniquant_pl.trainer import BlockTrainers, quiet_lightning

log = logging.getLogger(__name__)

Learned = dict[str, torch.Tensor]  # layers.<i>.<name> -> learned parameter


class BlockSequencer:
    """Drives the calibration with the given callbacks (`omniquant_pl.calibrate` adds the defaults)."""

    def __init__(self, config: RunConfig, callbacks: list[Callback] | None = None, model: nn.Module | None = None,
                 tokenizer: Any = None) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        self.processes = Processes.from_env()  # torchrun's processes (one without torchrun)
        self.processes.local_batch_size(config.train.batch_size, config.calib.nsamples)  # the batch splits over them
        self.output_dir = Path(config.output_dir)
        self.device = self.processes.device(resolve_device(config.train.accelerator))
        self.model, self.tokenizer = model, tokenizer
        self.streamed: StreamedBlocks | None = None  # model.streaming: the blocks stay on disk until used
        self.plan: RunPlan | None = None
        self.results: RunResults | None = None

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's files: rank 0 of a data-parallel run, or the only one."""
        return self.processes.is_rank_zero

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in [c for c in self.callbacks if isinstance(c, CalibrationCallback)]:
            if self.processes.is_rank_zero or not callback.rank_zero_only:
                getattr(callback, hook)(self, *args)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> RunResults:
        """Calibrate every block. Under torchrun every process runs this, each on its shard of the
        windows; rank 0 alone writes files and evaluates, and every process returns rank 0's results."""
        distributed.quiet_other_ranks(self.processes)
        distributed.init_process_group(self.processes, self.device)
        results = self._run()
        distributed.barrier()  # rank 0's files (results, saved model) are complete before any process exits
        self.results = distributed.broadcast_from_rank_zero(results)
        return self.results

    def setup(self) -> None:
        """Load the model (unless given), resolve the run plan, and refuse what cannot be quantized."""
        cfg = self.config
        quiet_lightning()
        shards = None
        if self.model is None:
            self.model, self.tokenizer, shards = load_model(cfg.model, self.device, load_model_and_tokenizer)
        self.model.eval()
        self.spec = get_arch(self.model)
        self.blocks = get_blocks(self.model, self.spec)
        check_quantizable(self.spec, self.blocks, cfg.quant)
        rotate_for_run(self.model, self.spec, cfg.quant, streamed=shards is not None)
        if shards is not None:
            self.streamed = StreamedBlocks(self.model, self.blocks, shards, self.output_dir, self.writes_files)
        self.plan = plan_run(cfg, self.processes, next(self.model.parameters()).dtype,
                             self.model.config.hidden_size, self.streamed is not None)  # logged
        self.compile_policy = CompilePolicy(self.plan.compile, self.plan.cuda_graph)
        self.trainers = BlockTrainers(self.plan, cfg.train, self.processes, self.callbacks, self.output_dir,
                                      experts=self.spec.experts is not None)
        self.amp = autocast_dtype(self.plan.precision)
        if cfg.quant.abits < 16:
            use_quantized_attention(self.model)
        if self.writes_files:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def _run(self) -> RunResults:
        started = time.perf_counter()
        restored = start_or_resume(self.config)  # refused before the model loads
        self.setup()
        self.results, learned = results_so_far(restored, self.config, self.model.config.model_type, self.plan)
        finished = self.results.finished_blocks
        if self.writes_files:
            atomic_write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), self.output_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._emit("on_calibration_start")
        distributed.barrier()  # while rank 0 evaluates the baselines
        fp_inputs = quant_inputs = self._capture_inputs(finished)
        calib_started = time.perf_counter()
        with active_policy(self.compile_policy):
            for index in range(len(self.blocks)):
                if index < finished:  # rebuild the inputs of the first unfinished block
                    fp_inputs, quant_inputs = self.replay_block(index, fp_inputs, quant_inputs, learned)
                    continue
                fp_inputs, quant_inputs, result, state = self.calibrate_block(index, fp_inputs, quant_inputs)
                learned.update({f"layers.{index}.{k}": v for k, v in state.items()})
                self.results.blocks.append(result)
                if self.writes_files:
                    write_checkpoint(self.output_dir, self.config, self.results, index, state)
                    self._write_results()
                self._emit("on_block_end", index, result)
        del fp_inputs, quant_inputs
        self.results.session_seconds = time.perf_counter() - calib_started
        return self._finish(started, learned)

    def _capture_inputs(self, finished: int) -> torch.Tensor:
        """Block 0's inputs for this process's calibration windows, as a cache; every block's kwargs."""
        cfg = self.config
        windows, source = calibration_windows(self.tokenizer, cfg.calib.source, cfg.calib.nsamples,
                                              cfg.calib.seqlen, cfg.calib.seed)
        check_calibration_ids(self.results, windows, source, self.output_dir)
        if distributed.differs_from_rank_zero((finished, self.results.calibration_ids_sha256)):
            raise OmniQuantError(
                f"the processes disagree with rank 0 on the run in {self.output_dir} (finished blocks or calibration "
                "token ids): give every node the same output_dir (a shared file system), model and calibration text"
            )
        captured = capture_block_inputs(self.model, self.spec, self.processes.shard(windows, cfg.train.batch_size))
        moved: dict[int, torch.Tensor] = {}  # blocks of one layer type share their mask and rotary tables
        self.layer_kwargs = [kwargs_to(kwargs, self.device, dtype_of(self.plan.block_dtype), moved)
                             for kwargs in captured.layer_kwargs]
        return cache_of(captured.hidden_states, dtype_of(self.plan.cache_dtype), torch.device(self.plan.cache_device),
                        self.device)  # (N, T, hidden)

    def _finish(self, started: float, learned: Learned) -> RunResults:
        """Write the learned parameters, evaluate (callbacks), save the model; time and memory."""
        results = self.results
        if self.writes_files:
            write_learned(self.output_dir, self.config, learned)
        results.calibration_seconds = sum(block.seconds for block in results.blocks)
        results.peak_accelerator_memory_bytes = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        results.peak_host_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._emit("on_calibration_end", results)
        if not self.writes_files:
            return results
        self._write_results()  # the evaluation is kept even if saving fails
        if self.config.save_model:
            results.saved_model = str(save_model(self.model, self.tokenizer, self.config.quant, self.output_dir,
                                                 self.streamed))
        elif self.streamed is not None:
            self.streamed.discard()
        results.total_seconds = time.perf_counter() - started  # load, calibration, evaluation, save
        self._write_results()
        self._emit("on_run_end", results)  # exports and checks of the saved files (callbacks)
        self._write_results()
        return results

    def _write_results(self) -> None:
        atomic_write_json(self.results.to_dict(), self.output_dir / "results.json")

    # -- one block -----------------------------------------------------------------------------
    def _load_block(self, index: int) -> nn.Module:
        """Block `index` on the device in its calibration dtype (streaming: read from the shards first)."""
        block = self.streamed.load_original(index) if self.streamed is not None else self.blocks[index]
        return block.to(self.device, dtype_of(self.plan.block_dtype))

    def _release_block(self, index: int, block: nn.Module) -> None:
        """Back to the CPU in the model's dtype; streaming: written to the output shards and dropped."""
        self.blocks[index] = block.to("cpu", dtype_of(self.plan.model_dtype))
        if self.streamed is not None:
            self.streamed.finish(index)

    def _propagate(self, block: nn.Module, inputs: torch.Tensor, index: int) -> torch.Tensor:
        return propagate(block, inputs, self.layer_kwargs[index], self.device, self.plan.local_batch_size, self.amp)

    def build_module(self, index: int, block: nn.Module, ranges: dict | None = None, power: dict | None = None):
        cfg = self.config
        return BlockModule(block, index, self.spec, self.layer_kwargs[index], cfg.quant, cfg.train, ranges,
                           self.compile_policy, ModelShape.of(self.model.config), power).to(self.device)

    def replay_block(self, index: int, fp_inputs: torch.Tensor, quant_inputs: torch.Tensor,
                     learned: Learned) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-apply a finished block's learned parameters (no training) and propagate both chains."""
        block = self._load_block(index)
        targets = self._propagate(block, fp_inputs, index)
        del fp_inputs
        module = self.build_module(index, block)
        try:
            module.load_learned_state(block_state(learned, index))
            module.fuse()
        except BaseException:
            self.blocks[index] = module.abandon().to("cpu", dtype_of(self.plan.model_dtype))
            raise
        if self.writes_files:  # the codes of this replay: the model saved at the end comes from the same fuse
            save_block_codes(self.output_dir, index, module.quantized_weights)
        next_quant_inputs = self._propagate(block, quant_inputs, index)
        self._release_block(index, block)
        return targets, next_quant_inputs

    def calibrate_block(self, index: int, fp_inputs: torch.Tensor, quant_inputs: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, BlockResult, Learned]:
        """Targets, build, fit, fuse, propagate: (next FP inputs, next quantized inputs, result, state)."""
        cfg, started = self.config, time.perf_counter()
        torch.manual_seed(cfg.calib.seed * 100_003 + index)
        block = self._load_block(index)
        module = None
        try:
            names = self.spec.input_range_names if cfg.quant.let else ()
            # from the targets pass: LET init statistics, lwc_search's input E[x²], tokens per expert
            with input_ranges(block, names) as ranges, expert_token_counts(block, self.spec.experts) as tokens, \
                    input_power(block, self.spec.linear_names if cfg.quant.lwc_search else ()) as power:
                targets = self._propagate(block, fp_inputs, index)
            del fp_inputs
            distributed.global_ranges(ranges)  # over every process's windows (data-parallel runs)
            aug_targets = self._propagate(block, quant_inputs, index) if cfg.train.aug_loss else None
            module = self.build_module(index, block, ranges if cfg.quant.let else None, power)
            module.expert_tokens = distributed.global_sum(tokens)
            caches = [quant_inputs, targets] + ([aug_targets] if aug_targets is not None else [])
            result, state = self.fit_block(index, module, caches)
            next_quant_inputs = self._propagate(block, quant_inputs, index)
        except BaseException:  # the caller's model stays whole: original linears, no hooks, on the CPU
            self.blocks[index] = (module.abandon() if module is not None else block).to(
                "cpu", dtype_of(self.plan.model_dtype))
            raise
        del module, caches, quant_inputs, aug_targets
        self._release_block(index, block)
        result.seconds = time.perf_counter() - started
        return targets, next_quant_inputs, result, state

    def fit_block(self, index: int, module: BlockModule, caches: list[torch.Tensor]) -> tuple[BlockResult, Learned]:
        """Train and fuse one built block on its caches (quantized inputs, targets[, aug targets])."""
        cfg, plan, amp = self.config, self.plan, self.amp
        loader = cached_batch_loader(*caches, batch_size=plan.local_batch_size, shuffle=cfg.train.shuffle,
                                     seed=plan.shuffle_seed + index, steps_per_call=cfg.train.steps_per_call)
        # no-grad loss passes (RTN/initial/final) in larger batches
        eval_loader = cached_batch_loader(*caches, batch_size=max(plan.local_batch_size, 8), shuffle=False, seed=0)
        result = BlockResult(block=index)
        if plan.compile == "block" and cfg.train.epochs > 0:
            result.compiled_step = module.warm_up(loader.dataset[0], amp)
        if plan.cuda_graph:
            module.enable_cuda_graph(amp)
        if cfg.train.report_losses:
            with module.plain_rtn():
                result.rtn_loss = module.mean_loss(eval_loader, amp)
            result.init_loss = module.mean_loss(eval_loader, amp)
        initial_state = module.learned_state()
        self._emit("on_block_start", index, module)
        if cfg.train.epochs > 0 and module.trainable_parameters():
            self.trainers.fit_with_retries(index, module, loader, initial_state, result)
            module.to(self.device)  # Lightning's teardown leaves a GPU module on the CPU
            if module.use_cuda_graph:
                result.cuda_graph_step = module.graphed
        result.epoch_losses = module.epoch_losses
        if module.expert_tokens:
            result.expert_tokens = list(module.expert_tokens)
            report_unrouted_experts(module, initial_state)
        if cfg.train.report_losses:
            result.final_loss = module.mean_loss(eval_loader, amp)
            if cfg.train.keep_best:
                keep_best(index, module, initial_state, result, rtn=plan.keep_best_rtn)
        state = module.learned_state()
        self._emit("on_block_fit_end", index, module)
        if module.quant_linears:
            raise RuntimeError(f"block {index} was not fused: keep callbacks.fuse.FuseCallback (or a replacement "
                               "that calls module.fuse()) among the callbacks")
        if self.writes_files:
            save_block_codes(self.output_dir, index, module.quantized_weights)  # before the checkpoint counts it
        return result, state
