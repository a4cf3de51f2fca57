"""How a BlockModule's training step runs: eagerly, compiled (`train.compile: block`), and/or
replayed from a recorded CUDA graph (`train.cuda_graph`), under the run's CompilePolicy.

`block_loss` is the step's math (train.loss of the quantized block's output to the FP target, plus
to the aug target); `StepRunner` decides which form of it runs and falls back to the eager one,
for the rest of the run, where compiling or recording fails.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import nn

from omniquant_pl.compile_policy import CompilePolicy, compiled
from omniquant_pl.graph_step import GraphedTrainStep
from omniquant_pl.losses import LOSSES
from omniquant_pl.quant.freedoms import FREEDOMS

# `module` below is a block_module.BlockModule (not imported: it imports this module)


def block_loss(module: L.LightningModule, inputs: torch.Tensor, target: torch.Tensor,
               aug_target: torch.Tensor | None) -> torch.Tensor:
    """train.loss (MSE by default) of the quantized block's output to the FP target (+ to the aug
    target), in fp32."""
    loss_of = LOSSES[module.train_config.loss]
    output = module(inputs)
    loss = loss_of(output, target)
    if aug_target is not None:
        loss = loss + loss_of(output, aug_target)
    return loss


def compiled_block_loss():
    """`block_loss` under torch.compile: forward and backward each become one graph, shared by
    every block of a model (parameters are graph inputs, so a new block does not recompile)."""
    return compiled(block_loss)


class StepRunner:
    """The form of one block's training step: compiled or eager, recorded as a CUDA graph or not."""

    def __init__(self, policy: CompilePolicy | None = None) -> None:
        self.policy = policy or CompilePolicy("block", cuda_graph=True)  # standalone: what it is asked for
        self.compiled = False  # set by warm_up()
        self.use_cuda_graph = False  # set by enable_cuda_graph()
        self.graph_dtype: torch.dtype | None = None
        self.graphed_step: GraphedTrainStep | None = None

    def loss_function(self):
        return compiled_block_loss() if self.compiled else block_loss

    def warm_up(self, module: L.LightningModule, batch: tuple[torch.Tensor, ...], amp: torch.dtype | None) -> bool:
        """Compile the step with one forward/backward on `batch` (gradients dropped, parameters
        unchanged). On a compiler failure stay eager for the rest of the run. Returns whether the
        compiled step is in use."""
        if not self.policy.allows("block"):
            return False
        self.compiled = True
        module.train()
        batch = tuple(t.to(module.device, non_blocking=True) for t in batch)
        device = module.device.type
        if module.act_quantizers is not None:  # the compiled step skips forward's q/k/v check: check eagerly
            with torch.no_grad(), torch.autocast(device, dtype=amp, enabled=amp is not None):
                module(batch[0][:1])
        try:
            with torch.autocast(device, dtype=amp, enabled=amp is not None):
                loss = module.loss(batch)
            loss.backward()
        except Exception as err:  # noqa: BLE001 - any compiler failure: calibrate eagerly instead
            self.policy.fail("block", err)
            self.compiled = False
        finally:
            for param in module.parameters():
                param.grad = None
        return self.compiled

    def enable_cuda_graph(self, amp: torch.dtype | None) -> None:
        """Record each fit's step as a CUDA graph (see graph_step.py); CUDA only."""
        self.use_cuda_graph = True
        self.graph_dtype = amp

    def new_fit(self) -> None:
        self.graphed_step = None  # a new fit (a retry) has a new optimizer: record again

    def recorded_step(self, module: L.LightningModule, batch: tuple[torch.Tensor, ...]) -> GraphedTrainStep | None:
        """The fit's recorded step (recorded on the first full-size batch), or None where recording is
        off or failed, or no full-size batch came yet."""
        if not self.use_cuda_graph or isinstance(module.optimizers(), list):  # a graph records one optimizer
            return None
        full_size = batch[0].shape[0] == module.train_config.batch_size
        if self.graphed_step is None and full_size and self.policy.allows("cuda_graph"):
            try:
                self.graphed_step = GraphedTrainStep(module.loss, module.optimizers().optimizer, batch,
                                                     self.graph_dtype)
            except Exception as err:  # noqa: BLE001 - keep calibrating with the plain step
                self.policy.fail("cuda_graph", err)
        return self.graphed_step


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr·sign(grad): AutoRound's optimizer for rounding offsets (train.rounding_optimizer:
    signsgd). The step size is the same for every offset whatever its gradient's size."""

    def __init__(self, params, lr: float = 5e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad.sign(), alpha=-group["lr"])
        return loss


def block_optimizers(module: L.LightningModule):
    """AdamW over every learned freedom and LET, one parameter group each at its learning rate (and
    SignSGD for the rounding offsets with train.rounding_optimizer: signsgd). AdamW is fused on CUDA
    (capturable, so the step can be recorded in a CUDA graph) and multi-tensor elsewhere: the same
    values bit for bit as torch's default loop, ~2x faster."""
    train = module.train_config
    scale = module.lr_scale * train.lr_multiplier
    groups = [{"params": module.freedom_parameters(name), "lr": getattr(train, freedom.lr_field) * scale, "name": name}
              for name, freedom in FREEDOMS.items()]
    groups.append({"params": module.let_parameters(), "lr": train.let_lr * scale, "name": "let"})
    groups = [g for g in groups if g["params"]]
    signed = [g for g in groups if g["name"] == "rounding" and train.rounding_optimizer == "signsgd"]
    # nothing else to learn (RTN): a no-op AdamW keeps the loop uniform
    groups = [g for g in groups if g not in signed] or [{"params": [nn.Parameter(torch.zeros((), device=module.device))],
                                                        "lr": 0.0}]
    on_cuda = module.device.type == "cuda"
    adamw = torch.optim.AdamW(groups, weight_decay=train.weight_decay, fused=on_cuda or None,
                              foreach=None if on_cuda else True, capturable=module.use_cuda_graph and on_cuda)
    return [adamw, SignSGD(signed)] if signed else adamw
