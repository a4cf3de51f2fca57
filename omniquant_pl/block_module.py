"""One transformer block as a LightningModule: trainable parameters are only LWC (and LET) ones.

The block runs through transformers' own module (attention included); its linears are swapped
for QuantLinears. The loss (train.loss: MSE by default, see losses.py) compares the quantized
block's output with the cached target of the full-precision block (plus, with `aug_loss`, the FP
block's output on the quantized inputs). How each step runs (eager, compiled, a CUDA graph) is
block_step.py's; the batches come from calib/batches.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from omniquant_pl.arch.base import ArchSpec
from omniquant_pl.arch.registry import check_supported
from omniquant_pl.block_step import StepRunner, block_loss, block_optimizers
from omniquant_pl.calib.capture import run_block
from omniquant_pl.calib.prefetch import on_device
from omniquant_pl.compile_policy import CompilePolicy
from omniquant_pl.config import QuantConfig, TrainConfig
from omniquant_pl.distributed import global_mean
from omniquant_pl.let.init import init_let_from_ranges
from omniquant_pl.let.params import LETParams
from omniquant_pl.quant.activation_hooks import BlockActivationQuantizers
from omniquant_pl.quant.codes import QuantizedWeight
from omniquant_pl.quant.experts import QuantExperts, quantize_block_experts, restore_block_experts
from omniquant_pl.quant.freedoms import FREEDOMS
from omniquant_pl.quant.gguf_mix import ModelShape
from omniquant_pl.quant.grids import build_quantizer, linear_grid, run_grid
from omniquant_pl.quant.init_search import search_block_clipping
from omniquant_pl.quant.linear import QuantLinear, quantize_block_linears, restore_block_linears, set_submodule
from omniquant_pl.quant.lwc import WeightQuantizer, clipping_disabled
from omniquant_pl.rotate import online_rotations

log = logging.getLogger(__name__)

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
        compile_policy: CompilePolicy | None = None,
        model_shape: ModelShape | None = None,
        input_power: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`model_shape` (layers, grouped-query heads) places the block in its model: a run with
        quant.gguf_type needs it to give each linear llama.cpp's type (quant/grids.py). `input_power`
        (each linear's per-channel input E[x²]) starts the clipping where quant.lwc_search puts it."""
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
        # LET scales, and shifts where biases absorb them (OPT; weight-only too, as the official OPT scripts:
        # the shift folds into the bias b + W·δ, a learned correction of the rounding's mean error)
        self.let: LETParams | None = None
        if quant.let:
            self.let = LETParams.for_run(block, spec, quant).to(next(block.parameters()).device)
            if input_ranges is not None:
                init_let_from_ranges(self.let, block, self.let.spec, input_ranges, quant.let_alpha)
        self.online_rotations = online_rotations(spec, quant.rotate, quant.rotate_seed, quant.rotate_online, block)
        def make_quantizer(shape: tuple[int, int], linear: str | None = None) -> WeightQuantizer:
            grid = linear_grid(quant, linear, index, shape[1], model_shape) if linear else run_grid(quant)
            return build_quantizer(grid, shape, quant)

        self.quant_linears: dict[str, QuantLinear] = quantize_block_linears(
            block, spec.linear_names, lambda name, linear: make_quantizer(tuple(linear.weight.shape), name),
            self.online_rotations)
        if input_power:
            search_block_clipping(index, self.quant_linears, input_power)
        # a mixture of experts: every expert's 3-D tensors, per expert and output channel/group
        self.quant_experts: QuantExperts | None = None
        if spec.experts is not None:
            self.quant_experts = quantize_block_experts(block, spec.experts, make_quantizer)
        self.expert_tokens: list[int] = []  # calibration tokens routed to each expert (set by the sequencer)
        self.act_quantizers = self._activation_quantizers()
        self.fused = False  # set by fuse(), with the codes of every linear in quantized_weights
        self.quantized_weights: dict[str, QuantizedWeight] = {}
        self.epoch_losses: list[float] = []
        self.epoch_steps = 0  # optimizer steps of the current epoch so far
        # manual optimization: each training_step runs the optimizer steps of a chunk of batches
        # (train.steps_per_call), so Lightning's per-call overhead is paid once per chunk
        self.automatic_optimization = False
        self.step_runner = StepRunner(compile_policy)  # eager, compiled or a recorded CUDA graph

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

    def freedom_parameters(self, freedom: str) -> list[nn.Parameter]:
        """Every weight quantizer's parameters of one learned freedom (quant/freedoms.py)."""
        return [p for quantizer in self.weight_quantizers().values() for p in quantizer.freedom_parameters(freedom)]

    def lwc_parameters(self) -> list[nn.Parameter]:
        return self.freedom_parameters("lwc")

    def let_parameters(self) -> list[nn.Parameter]:
        return list(self.let.parameters()) if self.let is not None else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for freedom in FREEDOMS for p in self.freedom_parameters(freedom)] + self.let_parameters()

    def _freedom_tensors(self):
        """(state key, parameter) of every learned freedom of every weight quantizer."""
        for name, quantizer in self.weight_quantizers().items():
            for freedom in FREEDOMS.values():
                for attr, key in zip(freedom.attributes, freedom.state_keys):
                    if getattr(quantizer, attr) is not None:
                        yield f"{name}.{key}", getattr(quantizer, attr)

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Learned parameters by name (``<linear>.lwc.upper``, ``<linear>.rounding``, ``let.qkv_scale`` ...),
        for safetensors."""
        state = {f"let.{name}": p.detach().float().cpu().clone() for name, p in (self.let.named_parameters() if self.let else [])}
        state.update({key: param.detach().float().cpu().clone() for key, param in self._freedom_tensors()})
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of learned_state()."""
        with torch.no_grad():
            for name, param in (self.let.named_parameters() if self.let else []):
                param.copy_(state[f"let.{name}"])
            for key, param in self._freedom_tensors():
                param.copy_(state[key])

    @torch.no_grad()
    def make_rtn(self) -> None:
        """Set the learned parameters so the block computes round-to-nearest exactly: every freedom at its
        identity (clipping factors σ(γ) = σ(β) = 1.0 in fp32, no rounding offsets or weight deltas) and
        the identity LET."""
        for quantizer in self.weight_quantizers().values():
            quantizer.disable_clipping()
        if self.let is not None:
            self.let.reset_to_identity()

    def abandon(self) -> nn.Module:
        """The block as it was when calibration stops early (an exception, Ctrl-C): its nn.Linear modules on
        their untouched weights (only fuse() changes them, and a fused block keeps them), no hooks."""
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
                       for name, quantizer in self.quant_experts.quantizers.items() if quantizer.upper_logit is not None}
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
        return self.step_runner.loss_function()(self, inputs, target, aug_target[0] if aug_target else None)

    def warm_up(self, batch: tuple[torch.Tensor, ...], autocast_dtype: torch.dtype | None) -> bool:
        """Compile the training step (see StepRunner.warm_up); returns whether it is compiled."""
        return self.step_runner.warm_up(self, batch, autocast_dtype)

    def enable_cuda_graph(self, autocast_dtype: torch.dtype | None) -> None:
        self.step_runner.enable_cuda_graph(autocast_dtype)

    @property
    def use_cuda_graph(self) -> bool:
        return self.step_runner.use_cuda_graph

    @property
    def compile_block(self) -> bool:
        return self.step_runner.compiled

    @property
    def graphed(self) -> bool:
        """Whether the last fit replayed a recorded CUDA graph."""
        return self.step_runner.graphed_step is not None

    def on_train_start(self) -> None:
        self.step_runner.new_fit()

    def optimizer_step_on(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One AdamW step on one batch; returns its loss (detached)."""
        recorded = self.step_runner.recorded_step(self, batch)
        if recorded is not None and recorded.accepts(batch):
            return recorded(batch)
        optimizers = self.optimizers()  # through the precision plugin (autocast, loss scaling)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        for optimizer in optimizers:
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

    def configure_optimizers(self):
        return block_optimizers(self)

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
            name: linear.quantize(transformed.get(f"{name}.weight", linear.weight))
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
        self.act_quantizers = self._activation_quantizers()
        return self.block

    def _activation_quantizers(self) -> BlockActivationQuantizers | None:
        """Per-token input quantizers (with the online rotations) of a weight-activation run, else None."""
        abits = self.quant_config.abits
        return BlockActivationQuantizers(self.block, self.spec, abits, rotations=self.online_rotations) if abits < 16 else None


def report_unrouted_experts(module: BlockModule, initial_state: dict[str, torch.Tensor]) -> list[int]:
    """Log the calibration tokens each expert received; experts that received none keep their
    initial clipping (no gradient reached them), and the run says so. Returns them."""
    log.info("block %d: calibration tokens per expert %s", module.index, module.expert_tokens)
    unrouted = module.keep_initial_clipping_of_unrouted(initial_state)
    if unrouted:
        log.warning("block %d: experts %s received no calibration tokens; their weights keep the initial clipping "
                    "(no gradient reached them); more or longer calibration samples would route tokens to them",
                    module.index, unrouted)
    return unrouted
