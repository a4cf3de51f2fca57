"""A whole training step (zero grads, forward, MSE, backward, AdamW) recorded as one CUDA graph.

On a small block (SmolLM2: hidden 576) a step is ~100 small kernels whose launch and Python cost
exceeds their GPU time several times over; replaying a recorded graph costs one launch. Recording
needs the step's tensors at fixed addresses: the batch is copied into static buffers, gradients
are zeroed in the graph instead of being freed, and AdamW runs with `capturable=True`. The two
warm-up steps that recording needs are undone (parameters and optimizer state restored), so the
training trajectory is the one of the plain step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedTrainStep:
    def __init__(
        self,
        loss_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        example_batch: tuple[torch.Tensor, ...],
        autocast_dtype: torch.dtype | None,
        warmup_steps: int = 2,
    ) -> None:
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.static_batch = tuple(t.detach().clone() for t in example_batch)
        initial = [p.detach().clone() for p in self.params]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):  # allocates grads and optimizer state
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._step()
        finally:
            self._restore(initial)

    def _step(self) -> torch.Tensor:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            loss = self.loss_fn(self.static_batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _restore(self, initial: list[torch.Tensor]) -> None:
        torch.cuda.synchronize()
        for p, value in zip(self.params, initial):
            p.copy_(value)
        for state in self.optimizer.state.values():  # moments and step counts back to zero
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One optimizer step on `batch`; returns the loss (a static tensor: read it before the next call)."""
        for static, value in zip(self.static_batch, batch):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_loss
