"""The fast path's GPU kernel: every tensor's shape follows from the batch's (B, L) shape.

The ``index`` kernel (fast_path.py) lists the real (center, word) pairs of a padded batch and
the unique rows each table touches; those counts are host-side shapes, so each costs a host
sync (three per step), and a step whose shapes change from batch to batch cannot be captured
by a CUDA graph. This kernel keeps the padded (B, L) layout instead and masks the padding:

* forward: gather the B center rows and the B·L slot rows, one batched matmul for the B·L
  dot products, the reference's masked sigmoid BCE, per example;
* backward: each slot's coefficient (sigmoid - label, masked, times the example's weight over
  its pair count), one batched matmul for the center rows, and the slot rows summed into the
  context table's touched rows at a fixed length (model/static_rows.py);
* gradients are sparse COO at fixed lengths, min(B, V) center rows and min(B·L, V) context
  rows, padded with zero-valued entries, so the exchange and the optimizers see the same
  shapes every step.

It reads L slots per example where ~26 of 60 are real on PTB's window 5: the bet is that on a
GPU the extra bytes cost less than the syncs they remove (not yet measured: benchmarks/gpu.sh
times both kernels); on CPU the ``fused`` kernel is 16x faster.
An example with no contexts (``num_contexts`` 0, how the trainer pads a short batch to its
fixed size) scores 0 and moves nothing. The loss is the reference's: tests/test_fast_path.py
holds this kernel to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from dist_w2v.model.static_rows import (
    real_slot_mask,
    row_sparse,
    static_slot_rows,
    static_unique_rows,
)

# Rows that absorb the padding slots' zero gradients (spread, so no row is a hot spot).
SCRATCH_ROWS = 1024


class StaticSkipGramLoss(torch.autograd.Function):
    """Per-example loss (B,) of the padded batch; fixed-length sparse gradients for both tables."""

    @staticmethod
    def forward(ctx: Any, center_weight: torch.Tensor, context_weight: torch.Tensor,
                centers: torch.Tensor, contexts_negatives: torch.Tensor,
                num_contexts: torch.Tensor, num_negatives: int) -> torch.Tensor:
        batch, width = contexts_negatives.shape
        words = contexts_negatives.reshape(-1).to(torch.int64)
        centers = centers.to(torch.int64)
        dtype = center_weight.dtype
        real = real_slot_mask(contexts_negatives, num_contexts, num_negatives).to(dtype)  # (B, L)
        is_context = real_slot_mask(contexts_negatives, num_contexts, 0).to(dtype)  # first n_i
        # The reference's mask.sum(1); at least 1 so that padding examples give 0, not 0/0.
        pairs = real.sum(1).clamp_min_(1.0)
        v = center_weight.index_select(0, centers)  # (B, D)
        u = context_weight.index_select(0, words).view(batch, width, -1)  # (B, L, D)
        scores = torch.bmm(u, v.unsqueeze(2)).squeeze(2)  # (B, L)
        # BCE with logits: softplus(-x) for a context (label 1), softplus(x) for a negative.
        pair_loss = F.softplus(scores * (1.0 - 2.0 * is_context)) * real
        ctx.shapes = (center_weight.shape, context_weight.shape)
        ctx.save_for_backward(scores, real, is_context, pairs, v, u, centers, words)
        return pair_loss.sum(1) / pairs

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        scores, real, is_context, pairs, v, u, centers, words = ctx.saved_tensors
        center_shape, context_shape = ctx.shapes
        # d softplus(±x)/dx = sigmoid(x) - label, times the example's weight / its pair count.
        coefficient = (torch.sigmoid(scores) - is_context) * real
        coefficient *= (grad_output / pairs).unsqueeze(1)  # (B, L)
        grad_v = torch.bmm(coefficient.unsqueeze(1), u).squeeze(1)  # (B, D)
        per_slot = (coefficient.unsqueeze(2) * v.unsqueeze(1)).reshape(words.shape[0], -1)
        real_slot = real > 0
        word_rows, word_position = static_slot_rows(words.view(real.shape), real_slot,
                                                    context_shape[0])
        # Padding slots' zeros go into scratch rows round-robin, cut off after: added to the
        # row their position names, they would all hit the same few rows (a GPU hot spot).
        real_slot = real_slot.reshape(-1)
        num_rows = word_rows.shape[0]
        scratch = num_rows + torch.arange(words.shape[0], device=words.device) % SCRATCH_ROWS
        target = torch.where(real_slot, word_position, scratch)
        grad_u = per_slot.new_zeros((num_rows + SCRATCH_ROWS, per_slot.shape[1]))
        grad_u = grad_u.index_add_(0, target, per_slot)[:num_rows]
        center_rows, center_position = static_unique_rows(centers, center_shape[0])
        grad_c = grad_v.new_zeros((center_rows.shape[0], grad_v.shape[1]))
        grad_c.index_add_(0, center_position, grad_v)
        return (row_sparse(center_rows, grad_c, center_shape),
                row_sparse(word_rows, grad_u, context_shape), None, None, None, None)
