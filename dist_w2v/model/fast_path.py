"""The fast skip-gram step: the padded batch's loss from its real pairs only, with gradients
that arrive already coalesced.

The padded reference (model.py) scores all L = 2·max_window·(1+K) slots of every center, about
26 of which are real on PTB, and ``nn.Embedding(sparse=True)`` hands back B·L gradient rows
that DDP's exchange and SparseAdam then coalesce (sort) again. Here a custom autograd Function
over the two embedding weights:

* lists the real (example, word) pairs of the padded batch (row-major, so example i's pairs
  are contiguous and its first n_i are the contexts), and the unique rows each table touches;
* scores the pairs: on CPU with ``sampled_addmm`` over a CSR pattern (examples x unique
  words), which never materialises a (pairs x D) tensor; on CUDA by gathering rows and taking
  row-wise dot products, which the GPU's bandwidth makes cheap;
* in backward forms each pair's gradient coefficient once and reduces it straight into one row
  per touched word and center (CSR x dense products on CPU, ``index_add_`` on CUDA);
* returns sparse COO gradients whose rows are unique and sorted, flagged coalesced, so DDP
  still exchanges sparse tensors (gloo's allreduce or our hooks) and the optimizers take them.
  (Autograd drops the flag when it stores ``.grad``; SparseAdam's ``coalesce()`` then sorts
  about V rows instead of B·L: 0.3-0.6 ms instead of 6-60 ms per step on this CPU.)

Kernels (``kernel=``): ``fused`` (the CPU default: model/fused_cpu.py, word2vec's inner loop
compiled by numba, about twice the speed of ``csr`` per step), ``csr`` (the tensor version
above, on CPU), ``index`` (the gathers), ``static`` (the CUDA default:
model/static_kernel.py, the padded slots masked, every shape fixed by the batch's, no host
sync) and ``triton`` (model/triton_kernel.py: the static kernel's shapes and gradients from two
fused Triton kernels that read only the real slots). All five compute the same loss and
gradients; tests/test_fast_path.py and tests/test_triton_kernel.py hold each to the padded
reference.

The loss is the reference's, per example: the mean of the sigmoid BCE over the example's real
slots. Per-example weights the caller applies (the trainer's W / global batch) arrive as
``grad_output``.

Why the kernels differ by device: cuSPARSE assumes CSR rows with sorted, distinct columns,
while a center's words repeat (a context twice in a window, a frequent negative drawn twice);
the CPU kernels simply add repeats (tests/test_fast_path.py holds both kernels to the
reference). Host syncs (``csr``, ``index``): a sparse tensor's row count is a host-side shape, so
listing the real pairs and each table's unique rows costs one implicit sync each (``nonzero``);
nothing else here reads device values back. ``static`` pads those lists to bounds instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from dist_w2v.config import KERNELS
from dist_w2v.errors import UserError
from dist_w2v.model.static_kernel import StaticSkipGramLoss
from dist_w2v.model.static_rows import SORT_BELOW_IDS_PER_ROW

# The CSR kernels are stable for the operations used here; the beta notice would print once per
# process (every rank) and says nothing actionable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")



@dataclass
class RealPairs:
    """The real (example, word) pairs of a padded batch, row-major."""

    example: torch.Tensor  # (P,) int64: which example (row of the batch) the pair belongs to
    word: torch.Tensor  # (P,) int64: the context or negative word
    is_context: torch.Tensor  # (P,) float: 1 for a context (label 1), 0 for a negative
    row_offsets: torch.Tensor  # (B+1,) int64: example i's pairs are [offsets[i], offsets[i+1])
    pairs_per_example: torch.Tensor  # (B,) float: n_i · (1 + K), the reference's mask.sum(1)


def real_pairs(contexts_negatives: torch.Tensor, num_contexts: torch.Tensor, num_negatives: int,
               dtype: torch.dtype = torch.float32) -> RealPairs:
    """The pairs the reference's mask keeps: slots [0, n_i) are contexts, [n_i, n_i(1+K)) noise."""
    width = contexts_negatives.shape[1]
    slots = torch.arange(width, device=contexts_negatives.device)
    n = num_contexts.to(torch.int64)
    pairs = n * (1 + num_negatives)
    example, slot = (slots < pairs.unsqueeze(1)).nonzero(as_tuple=True)
    offsets = torch.zeros(n.shape[0] + 1, dtype=torch.int64, device=n.device)
    torch.cumsum(pairs, 0, out=offsets[1:])
    return RealPairs(
        example=example,
        word=contexts_negatives[example, slot].to(torch.int64),
        is_context=(slot < n[example]).to(dtype),
        row_offsets=offsets,
        pairs_per_example=pairs.to(dtype),
    )


def unique_rows(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and each id's position among them (``torch.unique``'s inverse).

    Marking the ids in a table-sized flag vector is linear and beats sorting for batches that
    touch a fair share of the vocabulary (torch.sort is slow below ~32k elements on CPU); unlike
    ``bincount`` it does not read the largest id back to the host on CUDA.
    """
    ids = ids.to(torch.int64)
    if ids.numel() < SORT_BELOW_IDS_PER_ROW * num_rows:
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        return rows, inverse
    present = torch.zeros(num_rows, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
    rows = present.nonzero().squeeze(1)
    position = torch.cumsum(present, 0) - 1
    return rows, position[ids]


def counts_per_value(values: torch.Tensor, num_values: int) -> torch.Tensor:
    """``bincount`` without its read of the largest value back to the host on CUDA."""
    counts = torch.zeros(num_values, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, values, torch.ones_like(values))


def row_gradient(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (V, D) sparse gradient whose rows are unique and sorted: coalesced by construction."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, is_coalesced=True,
                                   check_invariants=False)


def _csr(row_offsets: torch.Tensor, columns: torch.Tensor, values: torch.Tensor,
         num_columns: int) -> torch.Tensor:
    """A CSR matrix with int32 indices (the CPU kernels convert int64 ones on every call).

    Columns may repeat within a row and need not be sorted: the kernels used here add repeats.
    """
    return torch.sparse_csr_tensor(
        row_offsets.to(torch.int32), columns.to(torch.int32), values,
        (row_offsets.shape[0] - 1, num_columns), check_invariants=False,
    )


def _by_word(pairs: RealPairs, columns: torch.Tensor, values: torch.Tensor,
             num_words: int) -> torch.Tensor:
    """The transposed pattern (unique words x examples), sorted by word with our own int32 sort:
    cheaper than letting ``G.t() @ v`` convert the CSC view back to CSR."""
    order = torch.sort(columns.to(torch.int32), stable=True).indices
    offsets = torch.zeros(num_words + 1, dtype=torch.int64, device=columns.device)
    torch.cumsum(counts_per_value(columns, num_words), 0, out=offsets[1:])
    return _csr(offsets, pairs.example.index_select(0, order), values.index_select(0, order),
                pairs.row_offsets.shape[0] - 1)


def pair_scores(kernel: str, pairs: RealPairs, columns: torch.Tensor, v: torch.Tensor,
                u: torch.Tensor) -> torch.Tensor:
    """(P,) dot products v[example] · u[column] of every real pair."""
    if kernel == "csr":
        ones = torch.ones_like(pairs.is_context, dtype=v.dtype)
        pattern = _csr(pairs.row_offsets, columns, ones, u.shape[0])
        sampled = torch.sparse.sampled_addmm(pattern, v, u.t(), beta=0.0)
        return sampled.values()
    return (v.index_select(0, pairs.example) * u.index_select(0, columns)).sum(1)


def pair_row_gradients(kernel: str, pairs: RealPairs, columns: torch.Tensor,
                       coefficient: torch.Tensor, v: torch.Tensor,
                       u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(coefficient · score) w.r.t. v (per example) and u (per unique word)."""
    if kernel == "csr":
        by_example = _csr(pairs.row_offsets, columns, coefficient, u.shape[0])
        return by_example @ u, _by_word(pairs, columns, coefficient, u.shape[0]) @ v
    scaled = coefficient.unsqueeze(1)
    grad_v = torch.zeros_like(v).index_add_(0, pairs.example, u.index_select(0, columns) * scaled)
    grad_u = torch.zeros_like(u).index_add_(0, columns, v.index_select(0, pairs.example) * scaled)
    return grad_v, grad_u


class SkipGramLoss(torch.autograd.Function):
    """Per-example loss (B,) of the padded batch; coalesced sparse gradients for both tables."""

    @staticmethod
    def forward(ctx: Any, center_weight: torch.Tensor, context_weight: torch.Tensor,
                centers: torch.Tensor, contexts_negatives: torch.Tensor,
                num_contexts: torch.Tensor, num_negatives: int, kernel: str) -> torch.Tensor:
        pairs = real_pairs(contexts_negatives, num_contexts, num_negatives, center_weight.dtype)
        center_rows, center_position = unique_rows(centers, center_weight.shape[0])
        word_rows, word_position = unique_rows(pairs.word, context_weight.shape[0])
        v = center_weight.index_select(0, centers.to(torch.int64))  # (B, D)
        u = context_weight.index_select(0, word_rows)  # (unique words, D)
        if kernel == "csr" and pairs.word.shape[0] > v.shape[0] * u.shape[0]:
            # sampled_addmm fails ("copy_: ... same number of specified elements") when a
            # pattern with repeated columns holds more entries than its dense shape: tiny
            # batches, such as the tail of an epoch. Host-side shapes, so no sync.
            kernel = "index"
        scores = pair_scores(kernel, pairs, word_position, v, u)
        # BCE with logits: softplus(-x) for a context (label 1), softplus(x) for a negative.
        pair_loss = F.softplus(scores * (1.0 - 2.0 * pairs.is_context))
        total = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        total.index_add_(0, pairs.example, pair_loss)
        ctx.kernel = kernel
        ctx.pairs = pairs
        ctx.shapes = (center_weight.shape, context_weight.shape)
        ctx.save_for_backward(scores, v, u, center_rows, center_position, word_rows, word_position)
        return total / pairs.pairs_per_example

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        scores, v, u, center_rows, center_position, word_rows, word_position = ctx.saved_tensors
        pairs: RealPairs = ctx.pairs
        per_example = grad_output / pairs.pairs_per_example
        # d softplus(±x)/dx = sigmoid(x) - label, times the example's weight / its pair count.
        coefficient = (torch.sigmoid(scores) - pairs.is_context) * per_example[pairs.example]
        grad_v, grad_u = pair_row_gradients(ctx.kernel, pairs, word_position, coefficient, v, u)
        grad_centers = grad_v.new_zeros((center_rows.shape[0], grad_v.shape[1]))
        grad_centers.index_add_(0, center_position, grad_v)
        center_shape, context_shape = ctx.shapes
        return (row_gradient(center_rows, grad_centers, center_shape),
                row_gradient(word_rows, grad_u, context_shape), None, None, None, None, None)


# Kernels whose gradients have shapes fixed by the batch's (no host sync: train/loop.py pads
# short batches for them, and the exchange and optimizers take their fixed-length rows).
FIXED_SHAPE_KERNELS = ("static", "triton")


def default_kernel(device: torch.device) -> str:
    return "fused" if device.type == "cpu" else "static"


def resolve_kernel(requested: str, device: torch.device) -> str:
    """``train.kernel`` for tables on ``device``: auto picks the default, fused needs a CPU."""
    if requested == "auto":
        return default_kernel(device)
    if requested == "fused" and device.type != "cpu":
        raise UserError(f"train.kernel=fused runs on CPU tables only, and training is on "
                        f"{device.type}; use train.kernel=auto (static on GPUs) or index")
    if requested == "triton":
        check_triton(device)
    return requested


def check_triton(device: torch.device) -> None:
    """train.kernel=triton needs the triton package, and CUDA tables unless Triton interprets."""
    try:
        from dist_w2v.model.triton_kernel import interpreted
    except ImportError:
        raise UserError("train.kernel=triton needs the triton package (CUDA builds of torch "
                        "bring it); install triton or use train.kernel=static") from None
    if device.type != "cuda" and not interpreted():
        raise UserError(f"train.kernel=triton runs on CUDA tables, and training is on "
                        f"{device.type}; use train.kernel=auto (or TRITON_INTERPRET=1 to debug "
                        "the kernel on CPU in Triton's interpreter)")


def fast_skip_gram_loss(center_weight: torch.Tensor, context_weight: torch.Tensor,
                        centers: torch.Tensor, contexts_negatives: torch.Tensor,
                        num_contexts: torch.Tensor, num_negatives: int,
                        kernel: str | None = None) -> torch.Tensor:
    """The reference's per-example loss (B,), computed from the real pairs only."""
    kernel = kernel or default_kernel(center_weight.device)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "fused":
        if center_weight.device.type != "cpu":
            raise ValueError("the fused kernel runs on CPU tables only")
        from dist_w2v.model.fused_cpu import FusedSkipGramLoss  # numba: imported when used

        return FusedSkipGramLoss.apply(center_weight, context_weight, centers,
                                       contexts_negatives, num_contexts, num_negatives)
    if kernel == "static":
        return StaticSkipGramLoss.apply(center_weight, context_weight, centers,
                                        contexts_negatives, num_contexts, num_negatives)
    if kernel == "triton":
        from dist_w2v.model.triton_kernel import TritonSkipGramLoss  # triton: imported when used

        return TritonSkipGramLoss.apply(center_weight, context_weight, centers,
                                        contexts_negatives, num_contexts, num_negatives)
    return SkipGramLoss.apply(center_weight, context_weight, centers, contexts_negatives,
                              num_contexts, num_negatives, kernel)
