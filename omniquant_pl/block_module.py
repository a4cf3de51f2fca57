"""One transformer block as a LightningModule: trainable parameters are only LWC (and LET) ones.

The block runs through transformers' own module (attention included); its linears are swapped
for QuantLinears. The loss (train.loss: MSE by default, see losses.py) compares the quantized
block's output with the cached target of the full-precision block (plus, with `aug_loss`, the FP
block's output on the quantized inputs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, Sampler

from omniquant_pl.arch.attention_hooks import BlockActivationQuantizers
from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.registry import check_supported
from omniquant_pl.calib.capture import run_block
from omniquant_pl.calib.prefetch import on_device
from omniquant_pl.config import QuantConfig, TrainConfig
from omniquant_pl.distributed import global_mean
from omniquant_pl.graph_step import GraphedTrainStep
from omniquant_pl.let.init import init_let_from_ranges
from omniquant_pl.let.params import LETParams
from omniquant_pl.losses import LOSSES
from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.experts import QuantExperts, quantize_block_experts, restore_block_experts
from omniquant_pl.quant.linear import QuantLinear, quantize_block_linears, restore_block_linears, set_submodule
from omniquant_pl.quant.lwc import WeightQuantizer, clipping_disabled

log = logging.getLogger(__name__)


def block_loss(module: BlockModule, inputs: torch.Tensor, target: torch.Tensor,
               aug_target: torch.Tensor | None) -> torch.Tensor:
    """train.loss (MSE by default) of the quantized block's output to the FP target (+ to the aug
    target), in fp32."""
    loss_of = LOSSES[module.train_config.loss]
    output = module(inputs)
    loss = loss_of(output, target)
    if aug_target is not None:
        loss = loss + loss_of(output, aug_target)
    return loss


_compiled_block_loss = None
_block_compile_failed = False
_cuda_graph_failed = False


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def compiled_block_loss():
    """`block_loss` under torch.compile: forward and backward each become one graph, shared by
    every block of a model (parameters are graph inputs, so a new block does not recompile)."""
    global _compiled_block_loss
    if _compiled_block_loss is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_block_loss = torch.compile(block_loss)
    return _compiled_block_loss


class CachedBatches(Dataset):
    """Batches of (quantized inputs, targets[, aug targets]) sliced from caches (views, no copy).
    A list of indices gives a chunk: the list of those batches."""

    def __init__(self, *caches: torch.Tensor, batch_size: int) -> None:
        self.caches = caches
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.caches[0].shape[0] // self.batch_size)

    def __getitem__(self, index: int | list[int]) -> tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]]:
        if isinstance(index, list):
            return [self[i] for i in index]
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return tuple(cache[rows] for cache in self.caches)  # each (B, seqlen, hidden)


class BatchOrder(Sampler):
    """Batch indices of an epoch: in order, or a permutation seeded by (seed, epoch) alone, so the
    order never depends on how often the loader was iterated (Lightning calls set_epoch). With
    `chunk`, yields lists of that many consecutive indices of the same order (the last may be
    shorter)."""

    def __init__(self, num_batches: int, shuffle: bool, seed: int, chunk: int | None = None) -> None:
        self.num_batches, self.shuffle, self.seed, self.chunk = num_batches, shuffle, seed, chunk
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches if self.chunk is None else -(-self.num_batches // self.chunk)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_batches, generator=generator).tolist()
        else:
            order = list(range(self.num_batches))
        if self.chunk is None:
            yield from order
        else:
            for start in range(0, self.num_batches, self.chunk):
                yield order[start : start + self.chunk]


def cached_batch_loader(*caches: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                        steps_per_call: int | None = None) -> DataLoader:
    """Batches of the caches (see BatchOrder); with `steps_per_call`, chunks of that many batches."""
    dataset = CachedBatches(*caches, batch_size=batch_size)
    order = BatchOrder(len(dataset), shuffle, seed, steps_per_call)
    # its own generator: iterating the loader leaves the global RNG alone
    return DataLoader(dataset, batch_size=None, sampler=order, generator=torch.Generator().manual_seed(seed))


class BlockModule(L.LightningModule):
    """Quantized copy of block `index`, trained to match the FP block's cached outputs."""

    def __init__(
        self,
        block: nn.Module,
        index: int,
        spec: ArchSpec,
        block_kwargs: dict[str, Any],
        quant: QuantConfig,
        train: TrainConfig,
        input_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        check_supported(spec, quant.let, quant.abits)  # a weight-only spec never reaches the LET or activation code
        self.index = index
        self.spec = spec
        self.lr_scale = 1.0
        self.quant_config = quant
        self.train_config = train
        self.block = block
        self.block.requires_grad_(False)
        self.block_kwargs = block_kwargs
        # LET scales, and shifts where biases absorb them (OPT). Weight-only too, as the official
        # OPT scripts: the shift folds into the bias with the unquantized weight, b + W·δ, so the
        # block computes Wq·x + (W − Wq)·δ + b, a learned correction of the rounding's mean error.
        self.let: LETParams | None = None
        if quant.let:
            let_spec = spec if quant.let_up_down else dataclasses.replace(spec, up_down=None)
            self.let = LETParams(block, let_spec).to(next(block.parameters()).device)
            if input_ranges is not None:
                init_let_from_ranges(self.let, block, let_spec, input_ranges, quant.let_alpha)
        def make_quantizer(shape: tuple[int, int]) -> WeightQuantizer:
            return WeightQuantizer(shape, bits=quant.wbits, group_size=quant.group_size, symmetric=quant.symmetric,
                                   gguf_grid=quant.grid == "gguf", learnable_clipping=quant.lwc, init=quant.lwc_init)

        self.quant_linears: dict[str, QuantLinear] = quantize_block_linears(
            block, spec.linear_names, lambda linear: make_quantizer(tuple(linear.weight.shape)))
        # a mixture of experts: every expert's 3-D tensors, per expert and output channel/group
        self.quant_experts: QuantExperts | None = None
        if spec.experts is not None:
            self.quant_experts = quantize_block_experts(block, spec.experts, make_quantizer)
        self.expert_tokens: list[int] = []  # calibration tokens routed to each expert (set by the sequencer)
        self.act_quantizers = BlockActivationQuantizers(block, spec, quant.abits) if quant.abits < 16 else None
        self.fused = False  # set by fuse(), with the codes of every linear in quantized_weights
        self.quantized_weights: dict[str, QuantizedWeight] = {}
        self.epoch_losses: list[float] = []
        self.epoch_steps = 0  # optimizer steps of the current epoch so far
        self.compile_block = False  # set by warm_up()
        # manual optimization: each training_step runs the optimizer steps of a chunk of batches
        # (train.steps_per_call), so Lightning's per-call overhead is paid once per chunk
        self.automatic_optimization = False
        # train.cuda_graph: each step replays a recorded CUDA graph
        self.graph_step_dtype: torch.dtype | None = None
        self.use_cuda_graph = False
        self._graphed_step = None

    # -- parameters --------------------------------------------------------------------------
    def weight_quantizers(self) -> dict[str, WeightQuantizer]:
        """Every weight quantizer by the path of the weight it quantizes: a linear's name, or an
        expert tensor's path (``mlp.experts.gate_up_proj``)."""
        quantizers = {name: linear.weight_quantizer for name, linear in self.quant_linears.items()
                      if linear.weight_quantizer is not None}
        if self.quant_experts is not None:
            quantizers.update({f"{self.spec.experts.module}.{name}": quantizer
                               for name, quantizer in self.quant_experts.quantizers.items()})
        return quantizers

    def lwc_parameters(self) -> list[nn.Parameter]:
        params = []
        for quantizer in self.weight_quantizers().values():
            if quantizer.learnable:
                params += [quantizer.upper_logit, quantizer.lower_logit]
        return params

    def let_parameters(self) -> list[nn.Parameter]:
        return list(self.let.parameters()) if self.let is not None else []

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Learned parameters by name (``<linear>.lwc.upper``, ``let.qkv_scale`` ...), for safetensors."""
        state = {f"let.{name}": p.detach().float().cpu().clone() for name, p in (self.let.named_parameters() if self.let else [])}
        for name, quantizer in self.weight_quantizers().items():
            if quantizer.learnable:
                state[f"{name}.lwc.upper"] = quantizer.upper_logit.detach().float().cpu().clone()
                state[f"{name}.lwc.lower"] = quantizer.lower_logit.detach().float().cpu().clone()
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of learned_state()."""
        with torch.no_grad():
            for name, param in (self.let.named_parameters() if self.let else []):
                param.copy_(state[f"let.{name}"])
            for name, quantizer in self.weight_quantizers().items():
                if quantizer.learnable:
                    quantizer.upper_logit.copy_(state[f"{name}.lwc.upper"])
                    quantizer.lower_logit.copy_(state[f"{name}.lwc.lower"])

    @torch.no_grad()
    def make_rtn(self) -> None:
        """Set the learned parameters so the block computes round-to-nearest exactly: clipping factors
        σ(γ) = σ(β) = 1.0 (fp32) and the identity LET."""
        for quantizer in self.weight_quantizers().values():
            quantizer.disable_clipping()
        if self.let is not None:
            self.let.reset_to_identity()

    def abandon(self) -> nn.Module:
        """Give the block back as it was when calibration stops early (an exception, Ctrl-C): the
        original nn.Linear modules on their untouched weights (LET only changes weights when
        fuse() folds it) and no activation-quantizer hooks. A block already fused keeps its fused
        weights. Returns the block."""
        if self.act_quantizers is not None:
            self.act_quantizers.remove()
            self.act_quantizers = None
        for name, quant_linear in self.quant_linears.items():
            set_submodule(self.block, name, quant_linear.original_linear())
        self.quant_linears = {}
        if self.quant_experts is not None:
            restore_block_experts(self.block, self.spec.experts, None)
            self.quant_experts = None
        return self.block

    @torch.no_grad()
    def keep_initial_clipping_of_unrouted(self, initial_state: dict[str, torch.Tensor]) -> list[int]:
        """Experts that received no calibration tokens (`expert_tokens`) keep their initial
        clipping (no gradient reached them; this also undoes weight decay). Returns them."""
        unrouted = [expert for expert, count in enumerate(self.expert_tokens) if count == 0]
        if unrouted and self.quant_experts is not None:
            module = self.spec.experts.module
            initial = {name: (initial_state[f"{module}.{name}.lwc.upper"], initial_state[f"{module}.{name}.lwc.lower"])
                       for name, quantizer in self.quant_experts.quantizers.items() if quantizer.learnable}
            self.quant_experts.reset_experts(unrouted, initial)
        return unrouted

    # -- Lightning --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BlockModule:
        super().train(mode)
        self.block.eval()  # no dropout / layer-drop while calibrating
        return self

    @contextlib.contextmanager
    def plain_rtn(self):
        """Round-to-nearest reference: no learned clipping and no LET (activation quant stays)."""
        let, self.let = self.let, None
        try:
            with clipping_disabled(self):
                yield
        finally:
            self.let = let

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # eager forwards check that q/k/v were quantized (compiled ones: warm_up checks eagerly first)
        if torch.compiler.is_compiling() or self.act_quantizers is None:
            return self._block_forward(hidden_states)
        with self.act_quantizers.expect_qkv_quantized(f"block {self.index}"):
            return self._block_forward(hidden_states)

    def _block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.let is None:
            return run_block(self.block, hidden_states, self.block_kwargs)
        # the frozen norm/linear parameters are swapped for their LET-transformed versions
        out = functional_call(self.block, self.let.transformed(self.block), (hidden_states,), self.block_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, target, *aug_target = batch
        loss_fn = compiled_block_loss() if self.compile_block else block_loss
        return loss_fn(self, inputs, target, aug_target[0] if aug_target else None)

    def warm_up(self, batch: tuple[torch.Tensor, ...], autocast_dtype: torch.dtype | None) -> bool:
        """Compile the training step (`train.compile: block`) with one forward/backward on
        `batch` (gradients dropped, parameters unchanged). On a compiler failure warn and stay
        eager for the rest of the run. Returns whether the compiled step is in use."""
        global _block_compile_failed
        if _block_compile_failed:
            return False
        self.compile_block = True
        self.train()
        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        if self.act_quantizers is not None:  # the compiled step skips forward's q/k/v check
            with torch.no_grad(), torch.autocast(self.device.type, dtype=autocast_dtype,
                                                 enabled=autocast_dtype is not None):
                self(batch[0][:1])
        try:
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = self.loss(batch)
            loss.backward()
        except Exception as err:  # noqa: BLE001 - any compiler failure: calibrate eagerly instead
            log.warning("compiling the block step failed (%s); running eagerly", _first_line(err))
            _block_compile_failed = True
            self.compile_block = False
        finally:
            for param in self.parameters():
                param.grad = None
        return self.compile_block

    def enable_cuda_graph(self, autocast_dtype: torch.dtype | None) -> None:
        """Record each fit's step as a CUDA graph (see graph_step.py); CUDA only."""
        self.use_cuda_graph = True
        self.graph_step_dtype = autocast_dtype

    def on_train_start(self) -> None:
        self._graphed_step = None  # a new fit (a retry) has a new optimizer: record again

    @property
    def graphed(self) -> bool:
        """Whether the last fit replayed a recorded CUDA graph."""
        return self._graphed_step is not None

    def _recorded_step(self, batch: tuple[torch.Tensor, ...]) -> GraphedTrainStep | None:
        """The fit's recorded step (recorded on the first full-size batch), or None where recording
        failed or no full-size batch came yet."""
        global _cuda_graph_failed
        full_size = batch[0].shape[0] == self.train_config.batch_size
        if self._graphed_step is None and full_size and not _cuda_graph_failed:
            try:
                self._graphed_step = GraphedTrainStep(self.loss, self.optimizers().optimizer, batch,
                                                      self.graph_step_dtype)
            except Exception as err:  # noqa: BLE001 - keep calibrating with the plain step
                log.warning("recording the step as a CUDA graph failed (%s); running it eagerly", _first_line(err))
                _cuda_graph_failed = True
        return self._graphed_step

    def optimizer_step_on(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One AdamW step on one batch; returns its loss (detached)."""
        recorded = self._recorded_step(batch) if self.use_cuda_graph else None
        if recorded is not None and recorded.accepts(batch):
            return recorded(batch)
        optimizer = self.optimizers()  # through the precision plugin (autocast, loss scaling)
        optimizer.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum = torch.zeros((), device=self.device)
        self.epoch_steps = 0

    def transfer_batch_to_device(self, chunk: Any, device: torch.device, dataloader_idx: int) -> Any:
        return chunk  # training_step moves each batch itself, copying the next during the step

    def training_step(self, chunk: list[tuple[torch.Tensor, ...]], chunk_idx: int) -> None:
        """The optimizer steps of a chunk of batches, one batch after the other."""
        for batch in on_device(chunk, self.device):
            self._epoch_loss_sum.add_(self.optimizer_step_on(batch))
            self.epoch_steps += 1

    def current_epoch_loss(self) -> float:
        """Mean training loss of the epoch so far on this process's windows (one host sync; call
        once per epoch)."""
        return (self._epoch_loss_sum / max(self.epoch_steps, 1)).item()

    def on_train_epoch_end(self) -> None:
        # over every process's steps (data-parallel runs): all of them stop or go on together
        epoch_loss = global_mean(self._epoch_loss_sum, self.epoch_steps)
        self.epoch_losses.append(epoch_loss)
        if not math.isfinite(epoch_loss):
            self.trainer.should_stop = True  # the sequencer restores and retries
        # sync_dist: the values are the same on every process already (it quiets Lightning's advice)
        self.log("block", float(self.index), on_epoch=True, sync_dist=True)
        self.log("train_loss", epoch_loss, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        train = self.train_config
        scale = self.lr_scale * train.lr_multiplier
        groups = [
            {"params": self.lwc_parameters(), "lr": train.lwc_lr * scale, "name": "lwc"},
            {"params": self.let_parameters(), "lr": train.let_lr * scale, "name": "let"},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:  # nothing to learn (RTN): a no-op optimizer keeps the loop uniform
            groups = [{"params": [nn.Parameter(torch.zeros((), device=self.device))], "lr": 0.0}]
        # fused on CUDA: one kernel for all parameters per step; capturable: its step count lives
        # on the GPU, so the step can be recorded in a CUDA graph. Elsewhere foreach (torch's
        # default there is a loop over parameters): the same values bit for bit, ~2x faster
        on_cuda = self.device.type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=self.train_config.weight_decay, fused=on_cuda or None,
                                 foreach=None if on_cuda else True, capturable=self.use_cuda_graph and on_cuda)

    # -- outside the Trainer -----------------------------------------------------------------
    @torch.no_grad()
    def mean_loss(self, loader: DataLoader, autocast_dtype: torch.dtype | None) -> float:
        """Mean loss over every sample of the loader without training (RTN/initial/final loss).
        Eager: a few passes per block do not pay for compiling inference graphs."""
        total = torch.zeros((), device=self.device)
        samples = 0
        for inputs, target, *aug_target in on_device(loader, self.device):
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = block_loss(self, inputs, target, aug_target[0] if aug_target else None)
            total += loss * inputs.shape[0]  # weighted: the last batch may be smaller
            samples += inputs.shape[0]
        return global_mean(total, samples)  # over every process's windows (data-parallel runs)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """Fold LET into the norms/linears, bake the clipped weights into plain nn.Linear modules
        and move the activation quantizers onto them. Returns the block (original structure).

        Each linear is quantized from its LET-transformed fp32 weight (the value training
        quantized); its codes are kept in `quantized_weights` and the linear holds exactly their
        dequantized value. A second call is a no-op (folding twice would corrupt the weights)."""
        if self.fused:
            return self.block
        transformed = self.let.transformed(self.block) if self.let is not None else {}
        self.quantized_weights = {
            name: linear.weight_quantizer.quantize(transformed.get(f"{name}.weight", linear.weight))
            for name, linear in self.quant_linears.items()
            if linear.weight_quantizer is not None
        }
        if self.quant_experts is not None:  # codes of (experts·out, in) rows, by tensor path
            module = self.spec.experts.module
            tensors = {name: transformed[f"{module}.{name}"] for name in self.quant_experts.names
                       if f"{module}.{name}" in transformed}
            self.quantized_weights.update({f"{module}.{name}": codes
                                           for name, codes in self.quant_experts.quantize(tensors).items()})
        if self.let is not None:
            self.let.fold_into(self.block, transformed)
        if self.act_quantizers is not None:
            self.act_quantizers.remove()
        restore_block_linears(self.block, self.quantized_weights)
        self.quant_linears = {}
        if self.quant_experts is not None:
            restore_block_experts(self.block, self.spec.experts, self.quantized_weights)
            self.quant_experts = None
        self.fused = True
        if self.act_quantizers is not None:
            self.act_quantizers = BlockActivationQuantizers(self.block, self.spec, self.quant_config.abits)
        return self.block
