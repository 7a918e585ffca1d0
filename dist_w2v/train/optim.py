"""Optimizers for sparse embedding gradients and their learning-rate schedule."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dist_w2v.config import TrainConfig
from dist_w2v.errors import UserError
from dist_w2v.model.static_rows import sum_duplicate_rows


class DenseMomentAdam(torch.optim.Adam):
    """The seed's Adam: every row's moments decay and every row moves, every step.

    torch.optim.Adam rejects sparse gradients, so the (already exchanged) sparse gradient is
    scattered into a dense one just before the update. The tables, their ``.grad`` during
    backward and the DDP exchange all stay sparse; only this update touches all V·D entries,
    which is cheap for PTB-sized vocabularies. On PTB it trains markedly better than the lazy
    SparseAdam at the seed's learning rate (see the README), because rows keep moving on their
    momentum between the batches that touch them.
    """

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None and grad.is_sparse:
                    # Repeated rows add up, as to_dense() would sum them, without coalescing.
                    param.grad = torch.zeros_like(param).index_add_(0, grad._indices()[0],
                                                                    grad._values())
        return super().step(closure)


# Dense moments move every row every step. Measured on this 2-core CPU, one thread, one table:
# 18 ms per step at PTB's 6,719 x 100, 250 ms at 67k x 100, 750 ms at 200k x 100, against about
# 20 ms for a whole B=4096 step. Above this many entries per table the update would dominate
# training by an order of magnitude, so it is refused.
DENSE_ADAM_LIMIT = 10_000_000


class RowOptimizer(torch.optim.Optimizer):
    """An update applied table by table to the rows a gradient touches (``_update``).

    ``fixed_shapes``: the gradients come from the static kernel (model/static_kernel.py), rows
    listed at a fixed length with repeats; they are summed at that length instead of
    coalesced, whose row count would cost a host sync per table and step on a GPU.
    """

    def __init__(self, params, defaults: dict, fixed_shapes: bool = False):
        super().__init__(params, defaults)
        self.fixed_shapes = fixed_shapes
        # Set by a CUDA graph (train/step.py): the rate read from device memory, so that a
        # replayed step follows the schedule; param_groups keep the float (for checkpoints).
        self.device_lr: torch.Tensor | None = None

    def rate(self, group: dict) -> float | torch.Tensor:
        return group["lr"] if self.device_lr is None else self.device_lr

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def row_gradient(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The touched rows (each once; with fixed shapes, plus zero-valued padding entries)
        and their gradient rows, from a row-sparse or dense gradient."""
        grad = param.grad
        if not grad.is_sparse:
            return torch.arange(param.shape[0], device=param.device), grad
        if grad.sparse_dim() != 1:
            raise ValueError("row-wise optimizers take row-sparse gradients (sparse_dim 1), as "
                             "nn.Embedding(sparse=True) gives")
        if self.fixed_shapes:
            return sum_duplicate_rows(grad._indices()[0], grad._values())
        if grad.device.type == "cpu" and not grad.is_coalesced():
            # Autograd drops the fast path's coalesced flag when it stores .grad; rows already
            # strictly increasing need no sort (on a GPU, finding out would cost a sync).
            rows = grad._indices()[0]
            if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
                return rows, grad._values()
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()


class RowSGD(RowOptimizer):
    """Plain SGD on the listed rows, repeated rows added as they come: nothing to coalesce, so
    every kernel's gradients (and the padded path's B·L rows) take one ``index_add_``."""

    def __init__(self, params, lr: float):
        if lr <= 0:
            raise ValueError("RowSGD needs lr > 0")
        super().__init__(params, {"lr": lr})

    def _update(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        lr = self.rate(group)
        if not grad.is_sparse:
            param.sub_(grad * lr)
            return
        rows, values = grad._indices()[0], grad._values()
        if isinstance(lr, torch.Tensor):  # a graph's rate in device memory: no scalar alpha
            param.index_add_(0, rows, values * -lr)
        else:
            param.index_add_(0, rows, values, alpha=-lr)


class RowwiseAdagrad(RowOptimizer):
    """Lazy row-wise Adagrad (FBGEMM / torchrec's EXACT_ROWWISE_ADAGRAD) for embedding tables.

    One accumulator per row: for every row r the (exchanged, coalesced) gradient touches,
    ``sum[r] += mean(g_r ** 2)`` over its D entries, then ``w_r -= lr * g_r / (sqrt(sum[r]) +
    eps)``. Rows the batch does not touch and their accumulators stay as they are, so a step
    costs O(touched rows x D) (plus one coalesce of the gradient), never V x D, and the state is
    one float per row (allocated once, at the first step). The per-row normalisation is what
    lets large global batches work: a frequent row's gradient sums thousands of occurrences, a
    rare row's a few, and both take steps set by lr and the row's own history (lr·sqrt(D) in
    norm at a row's first touch) instead of SGD's step proportional to the count.
    """

    # On CPU the step runs as one compiled loop (train/compiled_updates.py); False: as tensor
    # operations, as on GPUs.
    compiled = True

    def __init__(self, params, lr: float = 0.1, eps: float = 1e-8,
                 initial_accumulator: float = 0.0, fixed_shapes: bool = False):
        if lr <= 0 or eps <= 0 or initial_accumulator < 0:
            raise ValueError("RowwiseAdagrad needs lr > 0, eps > 0 and initial_accumulator >= 0")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator": initial_accumulator},
                         fixed_shapes)

    def runs_compiled(self, param: torch.Tensor) -> bool:
        return (param.device.type == "cpu" and self.compiled and not self.fixed_shapes
                and self.device_lr is None)

    def warm_up(self) -> None:
        """Load (the first time on a machine: compile) the CPU kernel on scratch rows."""
        for group in self.param_groups:
            for param in group["params"]:
                if self.runs_compiled(param):
                    from dist_w2v.train.compiled_updates import rowwise_adagrad

                    rows = np.zeros((1, param.shape[1]), dtype=param.detach().numpy().dtype)
                    rowwise_adagrad(rows, np.zeros(1, dtype=rows.dtype), np.zeros(1, np.int64),
                                    rows.copy(), float(group["lr"]), float(group["eps"]))

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            # No step counter: the update does not use one, and under a CUDA graph (train/
            # step.py) this Python code runs only in the eager steps, so a count would stop.
            state["sum"] = torch.full((param.shape[0],), float(group["initial_accumulator"]),
                                      dtype=param.dtype, device=param.device)
        rows, values = self.row_gradient(param)
        accumulator = state["sum"]
        if self.runs_compiled(param):
            from dist_w2v.train.compiled_updates import rowwise_adagrad  # numba: when used

            rowwise_adagrad(param.detach().numpy(), accumulator.numpy(), rows.numpy(),
                            values.contiguous().numpy(), group["lr"], group["eps"])
            return
        accumulator.index_add_(0, rows, values.pow(2).mean(1))
        scale = accumulator.index_select(0, rows).sqrt_().add_(group["eps"]).reciprocal_()
        param.index_add_(0, rows, values * scale.mul_(-self.rate(group)).unsqueeze(1))


class RowCappedSGD(RowOptimizer):
    """Plain SGD on the touched rows, with each row's step capped in L2 norm.

    ``w_r -= lr * g_r * min(1, max_row_step / ||lr * g_r||)``. A row that few examples in the
    batch touch moves exactly as under SGD (word2vec's per-occurrence rate); a frequent row,
    whose gradient sums thousands of occurrences computed at the same stale parameters, moves at
    most ``max_row_step``. Stateless and lazy: O(touched rows x D) per step.
    """

    def __init__(self, params, lr: float, max_row_step: float, fixed_shapes: bool = False):
        if lr <= 0 or max_row_step <= 0:
            raise ValueError("RowCappedSGD needs lr > 0 and max_row_step > 0")
        super().__init__(params, {"lr": lr, "max_row_step": max_row_step}, fixed_shapes)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        rows, values = self.row_gradient(param)
        steps = values * self.rate(group)
        norms = steps.norm(dim=1, keepdim=True)
        scale = (group["max_row_step"] / norms.clamp_min(1e-30)).clamp_max_(1.0)
        param.index_add_(0, rows, steps.mul_(scale).neg_())



ROW_OPTIMIZERS = ("sgd", "rowwise_adagrad")
"""The train.optimizer values that :func:`build_optimizer` makes a RowOptimizer of."""


def build_optimizer(cfg: TrainConfig, model: nn.Module,
                    fixed_shapes: bool = False) -> torch.optim.Optimizer:
    """adam (dense moments, as the seed), sparse_adam (lazy: only touched rows), plain SGD, or
    rowwise_adagrad (lazy: touched rows only, one accumulator per row).

    All four take the sparse gradients that the embedding tables produce and DDP exchanges;
    ``fixed_shapes``: the static kernel's, rows at a fixed length with repeats (RowOptimizer).
    SparseAdam coalesces them (a host sync per table on a GPU); the others never do.
    """
    params = list(model.parameters())
    largest = max(p.numel() for p in params)
    if cfg.optimizer == "adam" and largest > DENSE_ADAM_LIMIT:
        raise UserError(
            f"train.optimizer=adam updates all {largest:,} entries of a table every step (dense "
            f"moments; refused above {DENSE_ADAM_LIMIT:,}); use train.optimizer=sparse_adam, "
            "which moves only the rows a batch touches"
        )
    if cfg.optimizer == "adam":
        return DenseMomentAdam(params, lr=cfg.lr)
    if cfg.optimizer == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=cfg.lr)
    if cfg.optimizer == "rowwise_adagrad":
        return RowwiseAdagrad(params, lr=cfg.lr, eps=cfg.adagrad_eps,
                              initial_accumulator=cfg.adagrad_init, fixed_shapes=fixed_shapes)
    if cfg.max_row_step > 0:
        return RowCappedSGD(params, lr=cfg.lr, max_row_step=cfg.max_row_step,
                            fixed_shapes=fixed_shapes)
    return RowSGD(params, lr=cfg.lr)


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The rate at a training position: an optional linear warm-up from 0 over the first
    ``warmup`` of training, times a constant or word2vec's linear decay from lr to lr_min.

    ``progress`` is the fraction of training done (epoch + step / steps) / epochs, so the
    schedule is a pure function of the position and survives resume without saved state.
    """
    progress = min(max(progress, 0.0), 1.0)
    lr = cfg.lr - (cfg.lr - cfg.lr_min) * progress if cfg.decays else cfg.lr
    if cfg.warmup > 0:
        lr *= min(1.0, progress / cfg.warmup)
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                      progress: float) -> float:
    lr = learning_rate(cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
