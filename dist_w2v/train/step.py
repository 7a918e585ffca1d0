"""One training step: run as it comes (``optimizer_step``), or captured once as a CUDA graph
and replayed (``GraphedStep``, ``train.cuda_graph``).

A fast-path step at a few thousand examples is launch-bound on a GPU: ~40 small kernels, each
launched from Python. With the static kernel every shape is fixed by the (padded) batch and
nothing reads a value back, so the whole step (forward, backward, optimizer) can be recorded
once and replayed with one launch. What changes from step to step lives in device buffers the
graph reads: the batch (copied in), the loss scale W / global batch, and the learning rate
(``RowOptimizer.device_lr``).

One process only (DDP's exchange runs Python hooks that a replay would skip) and the row
optimizers (sgd, rowwise_adagrad), whose state is created in the eager warm-up steps. The
warm-up steps run on a side stream, as torch.cuda.graphs asks, and are real training steps.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_w2v.data.examples import Batch
from dist_w2v.train.optim import RowOptimizer


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                   scale: float | torch.Tensor) -> torch.Tensor:
    """Forward, backward of the summed loss times ``scale``, the optimizer's step; the batch's
    summed loss, on the device."""
    optimizer.zero_grad(set_to_none=True)
    per_example = model(batch.centers, batch.contexts_negatives, batch.num_contexts,
                        batch.num_negatives)
    (per_example.sum() * scale).backward()
    optimizer.step()
    return per_example.detach().sum().to(torch.float64)

# Eager steps before the capture: lazy optimizer state, the allocator's pools, cuBLAS handles.
WARMUP_STEPS = 3


class GraphedStep:
    """One training step on static buffers: eager for ``WARMUP_STEPS`` steps, then captured
    and replayed. ``capture=False`` keeps it eager (the same buffers and device rate), which
    is how CPU tests check everything but the capture itself."""

    def __init__(self, model: nn.Module, optimizer: RowOptimizer, batch: Batch,
                 capture: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.capture = capture
        self.buffers = Batch(torch.zeros_like(batch.centers),
                             torch.zeros_like(batch.contexts_negatives),
                             torch.zeros_like(batch.num_contexts), batch.num_negatives)
        weight = next(model.parameters())
        self.scale = torch.zeros((), dtype=weight.dtype, device=weight.device)
        optimizer.device_lr = torch.zeros((), dtype=weight.dtype, device=weight.device)
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def step(self, batch: Batch, scale: float, lr: float) -> torch.Tensor:
        """Train on ``batch`` (of the buffers' shape) with the loss scaled by ``scale`` at rate
        ``lr``; the summed loss, on the device (valid until the next step)."""
        self.buffers.centers.copy_(batch.centers)
        self.buffers.contexts_negatives.copy_(batch.contexts_negatives)
        self.buffers.num_contexts.copy_(batch.num_contexts)
        self.scale.fill_(scale)
        self.optimizer.device_lr.fill_(lr)
        if not self.capture:
            return self._step()
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # The chunk builder's thread keeps allocating (and may sync) on its own stream
            # meanwhile: only this thread's calls must be capture-safe.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss = self._step()
        self.graph.replay()
        return self.loss

    def _step(self) -> torch.Tensor:
        return optimizer_step(self.model, self.optimizer, self.buffers, self.scale)
