"""How the sparse embedding gradients cross ranks under DDP.

* ``allreduce``: DDP's built-in sparse allreduce. gloo implements it; NCCL refuses it
  ("NCCL does not support all_reduce with sparse tensors").
* ``allgather``: a comm hook that coalesces the local sparse gradient, all-gathers row counts,
  then padded row indices and values with dense collectives, and hands DDP their sparse sum
  divided by the world size. Works on every backend; the default on NCCL.
* ``dense``: a comm hook that scatters the local rows into a dense (V, D+1) buffer (the extra
  column marks which rows were touched), all-reduces it, and hands DDP the touched rows as a
  sparse tensor. Bytes per step are fixed at V·(D+1)·4, which wins for small vocabularies.

Every hook returns a Future holding the sparse tensor itself: DDP copies it into ``.grad``, so
the tables keep sparse gradients and the optimizer sees exactly what allreduce would give.
DDP does not divide by the world size when a hook is registered; the hooks do.

With the static kernel (``fixed_shapes``) every rank's gradient lists the same number of rows
(its batch padded to batch_size / W, model/static_rows.py), so the all-gather sends no counts
first and the dense exchange marks untouched rows as padding instead of listing the touched
ones: neither reads a value back to the host. Their results repeat rows; the optimizers sum
them at a fixed length.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the hook's
# annotations with the real dist.GradBucket / Future[Tensor] objects and rejects strings.

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_w2v.errors import UserError
from dist_w2v.model.static_rows import PAD_ROW, row_sparse
from dist_w2v.parallel.env import DistEnv


def _done(result: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(result)
    return future


def comm_hook(exchange: Callable[[torch.Tensor, dist.ProcessGroup | None], torch.Tensor]):
    """A DDP comm hook that hands a sparse bucket to ``exchange`` (a dense bucket, never seen
    with this model, gets a plain averaged allreduce)."""

    def hook(group: dist.ProcessGroup | None,
             bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        grad = bucket.buffer()
        if not grad.is_sparse:
            return dist.all_reduce(grad.div_(dist.get_world_size(group)), group=group,
                                   async_op=True).get_future().then(lambda f: f.value()[0])
        return _done(exchange(grad, group))

    hook.__name__ = f"{exchange.__name__}_hook"
    return hook


def allgather_sparse(grad: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over ranks of sparse row gradients, exchanged with dense all-gathers."""
    world_size = dist.get_world_size(group)
    grad = grad.coalesce()
    rows = grad.indices()[0]
    values = grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in torch.cat(counts).tolist()]
    longest = max(sizes)
    padded_rows = rows.new_zeros(longest)
    padded_rows[: rows.numel()] = rows
    padded_values = values.new_zeros((longest,) + tuple(values.shape[1:]))
    padded_values[: values.shape[0]] = values
    gathered_rows = [torch.empty_like(padded_rows) for _ in range(world_size)]
    gathered_values = [torch.empty_like(padded_values) for _ in range(world_size)]
    dist.all_gather(gathered_rows, padded_rows, group=group)
    dist.all_gather(gathered_values, padded_values, group=group)
    all_rows = torch.cat([r[:n] for r, n in zip(gathered_rows, sizes, strict=True)])
    all_values = torch.cat([v[:n] for v, n in zip(gathered_values, sizes, strict=True)])
    total = torch.sparse_coo_tensor(all_rows.unsqueeze(0), all_values, grad.shape,
                                    check_invariants=False)
    return total.coalesce() / world_size


def dense_exchange(grad: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over ranks of sparse row gradients, exchanged as one dense allreduce."""
    world_size = dist.get_world_size(group)
    grad = grad.coalesce()
    rows = grad.indices()[0]
    num_rows, dim = grad.shape
    buffer = grad.values().new_zeros((num_rows, dim + 1))
    buffer[rows, :dim] = grad.values()
    buffer[rows, dim] = 1.0
    dist.all_reduce(buffer, group=group)
    touched = buffer[:, dim].nonzero().squeeze(1)
    values = buffer.index_select(0, touched)[:, :dim] / world_size
    return torch.sparse_coo_tensor(touched.unsqueeze(0), values, grad.shape, is_coalesced=True,
                                   check_invariants=False)


def allgather_fixed_rows(grad: torch.Tensor,
                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over ranks of sparse row gradients that list the same number of rows on every
    rank: their rows and values gathered as they are, repeats left for the optimizer."""
    world_size = dist.get_world_size(group)
    rows, values = grad._indices()[0], grad._values()
    gathered_rows = [torch.empty_like(rows) for _ in range(world_size)]
    gathered_values = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered_rows, rows, group=group)
    dist.all_gather(gathered_values, values, group=group)
    return row_sparse(torch.cat(gathered_rows), torch.cat(gathered_values) / world_size,
                      grad.shape)


def dense_exchange_fixed_rows(grad: torch.Tensor,
                              group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``dense_exchange`` at a fixed length: all V rows come back, an untouched one as a
    zero-valued PAD_ROW entry (SparseAdam must not see it as a zero gradient of its own row)."""
    world_size = dist.get_world_size(group)
    rows, values = grad._indices()[0], grad._values()
    num_rows, dim = grad.shape
    buffer = values.new_zeros((num_rows, dim + 1))
    buffer[:, :dim].index_add_(0, rows, values)
    buffer[:, dim].index_fill_(0, rows, 1.0)
    dist.all_reduce(buffer, group=group)
    every_row = torch.arange(num_rows, device=rows.device)
    listed = torch.where(buffer[:, dim] > 0, every_row, torch.full_like(every_row, PAD_ROW))
    return row_sparse(listed, buffer[:, :dim] / world_size, grad.shape)


# Above this, a dense exchange is refused: bytes per step of one table as a dense buffer. At
# 64 MB (160k words at D=100) it already moves 10x what a B=4096 sparse exchange does.
DENSE_EXCHANGE_LIMIT_BYTES = 64 << 20


@dataclass(frozen=True)
class ExchangeShape:
    """What decides the bytes an exchange sends per table and step."""

    vocab_size: int
    dim: int
    rows_per_rank: int
    """An estimate of the rows one rank's batch touches (before capping at the vocabulary)."""
    world_size: int

    def bytes(self, kind: str) -> int:
        if kind == "dense":
            return self.vocab_size * (self.dim + 1) * 4
        # Sparse: every rank receives every rank's rows (index + D float32 values).
        return self.world_size * min(self.vocab_size, self.rows_per_rank) * (self.dim * 4 + 8)


def resolve_exchange(requested: str, backend: str, shape: ExchangeShape | None = None) -> str:
    """The exchange to use. ``auto`` takes the one that sends fewer bytes (with no shape: the
    sparse one of the backend); ``dense`` is refused where the table is too large for it."""
    sparse = "allgather" if backend == "nccl" else "allreduce"
    if requested == "allreduce" and backend == "nccl":
        raise UserError(
            "dist.grad_exchange=allreduce needs gloo: NCCL has no sparse allreduce; "
            "use allgather or dense (or auto)"
        )
    if shape is None:
        return sparse if requested == "auto" else requested
    if requested == "auto":
        return "dense" if shape.bytes("dense") < shape.bytes(sparse) else sparse
    if requested == "dense" and shape.bytes("dense") > DENSE_EXCHANGE_LIMIT_BYTES:
        raise UserError(
            f"dist.grad_exchange=dense would all-reduce {shape.bytes('dense') >> 20} MB per table "
            f"and step ({shape.vocab_size} words x {shape.dim}); use dist.grad_exchange=auto or "
            f"{sparse}"
        )
    return requested


def wrap_model(model: nn.Module, env: DistEnv, exchange: str,
               shape: ExchangeShape | None = None, fixed_shapes: bool = False) -> nn.Module:
    """DDP-wrap ``model`` with the chosen sparse gradient exchange; unwrapped for one process.
    ``fixed_shapes``: the gradients come from the static kernel, at equal lengths on all ranks."""
    if not env.distributed:
        return model
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    chosen = resolve_exchange(exchange, env.backend or "gloo", shape)
    if chosen == "allgather":
        ddp.register_comm_hook(None, comm_hook(allgather_fixed_rows if fixed_shapes
                                               else allgather_sparse))
    elif chosen == "dense":
        ddp.register_comm_hook(None, comm_hook(dense_exchange_fixed_rows if fixed_shapes
                                               else dense_exchange))
    return ddp
