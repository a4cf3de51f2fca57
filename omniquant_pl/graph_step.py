"""A whole training step (zero grads, forward, MSE, backward, AdamW) recorded as one CUDA graph.

On a small block (SmolLM2: hidden 576) a step is ~100 small kernels whose launch and Python cost
exceeds their GPU time several times over; replaying a recorded graph costs one launch. Recording
needs the step's tensors at fixed addresses: the batch is copied into static buffers, gradients
are zeroed in the graph instead of being freed, and AdamW runs with `capturable=True`. The two
warm-up steps that recording needs are undone (parameters and optimizer state restored), so the
training trajectory is the one of the plain step. Batches of another shape (a short last batch)
are not for the graph: `accepts()` says so and the caller runs them with the plain step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def record_cuda_graph(step: Callable[[], None], warmup_steps: int) -> Callable[[], None]:
    """Run `step` `warmup_steps` times on a side stream (allocating gradients, optimizer state and
    compiled kernels), record one more call as a CUDA graph and return the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


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
        self.device_type = self.params[0].device.type
        self.static_batch = tuple(t.detach().clone() for t in example_batch)
        self.static_loss = torch.zeros((), device=self.params[0].device)
        initial_params = [p.detach().clone() for p in self.params]
        initial_state = {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
                         for p, state in optimizer.state.items()}  # steps taken before recording
        try:
            self.replay = record_cuda_graph(self._step, warmup_steps)
        finally:
            self._restore(initial_params, initial_state)
        # the graph writes into these gradients: keep them alive should a plain step free p.grad
        self.grads = [p.grad for p in self.params]

    def _step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            loss = self.loss_fn(self.static_batch)
        loss.backward()
        self.optimizer.step()
        self.static_loss.copy_(loss.detach())

    @torch.no_grad()
    def _restore(self, params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Parameters and optimizer state back to their values before the warm-up, in place (the
        graph holds their addresses); state the warm-up created goes to zero, as a fresh one."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        for p, value in zip(self.params, params):
            p.copy_(value)
        for p, tensors in self.optimizer.state.items():
            before = state.get(p, {})
            for name, value in tensors.items():
                if torch.is_tensor(value) and name in before:
                    value.copy_(before[name])
                elif torch.is_tensor(value):
                    value.zero_()

    def accepts(self, batch: tuple[torch.Tensor, ...]) -> bool:
        """Whether `batch` fits the recorded buffers (same number, shapes and dtypes of tensors)."""
        return len(batch) == len(self.static_batch) and all(
            t.shape == s.shape and t.dtype == s.dtype for t, s in zip(batch, self.static_batch))

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One optimizer step on `batch` (see accepts()); returns the loss (a static tensor: read it
        before the next call)."""
        for static, value in zip(self.static_batch, batch):
            static.copy_(value, non_blocking=True)
        self.replay()
        return self.static_loss
