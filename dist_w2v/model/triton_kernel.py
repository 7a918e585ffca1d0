"""The fast path's fused GPU kernel, written in Triton: word2vec's inner loop, one program per
example, reading each real pair's context row once per pass and writing no per-slot rows.

The ``static`` kernel (static_kernel.py) gathers all B·L slot rows into a (B, L, D) tensor,
takes batched matmuls over it, and writes a (B·L, D) tensor of per-slot gradients that
``index_add_`` then sums: about five passes of B·L·D floats through memory, half of them for
padding slots (1.2 GB per pass at B=16,384 with window 15). Here:

* forward: each program loads its center row once, then walks its example's real slots
  (``num_contexts · (1 + K)``, from the batch's own counts) a block at a time: loads the slot
  rows, takes the dot products, stores the scores (B, L) and sums the loss. Padding slots are
  masked out and never read.
* backward: the same walk; each slot's coefficient (sigmoid - label, times the example's
  weight over its pair count) scales the slot's row into the center's gradient and the
  center row into the slot's context gradient, added atomically into the touched rows.

Shapes stay fixed by the batch's (B, L), so the gradients are the static kernel's: sparse COO
at min(B, V) and min(B·L, V) rows from ``static_slot_rows``, nothing reads a device value
back, and a CUDA graph can capture the step (train.cuda_graph). The loss and gradients are the
padded reference's: tests/test_triton_kernel.py holds this kernel to it on CUDA, and on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1``: slow, for tests and debugging).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from dist_w2v.model.static_rows import (
    real_slot_mask,
    row_sparse,
    static_slot_rows,
    static_unique_rows,
)

# Slots per block (at a dimension of up to 128) and warps per program on a GPU: a (32, 128)
# float32 tile is 32 values a thread at 4 warps. Wider rows take proportionally fewer slots a
# block, so that the tile stays that size: ptxas gives the backward 255 registers at (32, 512)
# and spills at (64, 512), none at (8, 512) (tests/test_triton_kernel.py reads its report). Not
# yet tuned on a GPU (benchmarks/step_profile.py --triton-shapes times others). The interpreter
# runs one block per slot width instead: it pays per operation, not per element.
GPU_SLOT_BLOCK = 32
GPU_SLOT_BLOCK_WIDTH = 128  # the widest row block that takes GPU_SLOT_BLOCK slots
GPU_NUM_WARPS = 4


@triton.jit
def _example(center_w, centers, num_contexts, num_negatives, DIM: tl.constexpr,
             DIM_BLOCK: tl.constexpr):
    """This program's example: its context count, its real slot count, the dimension offsets
    (and which are inside D), its center row."""
    example = tl.program_id(0)
    n = tl.load(num_contexts + example).to(tl.int32)
    d = tl.arange(0, DIM_BLOCK)
    in_dim = d < DIM
    center = tl.load(centers + example).to(tl.int64)
    v = tl.load(center_w + center * DIM + d, mask=in_dim, other=0.0)
    return example, n, n * (1 + num_negatives), d, in_dim, v


@triton.jit
def _slot_rows(context_w, words, example, width, start, pairs, d, in_dim, DIM: tl.constexpr,
               SLOT_BLOCK: tl.constexpr):
    """Slots [start, start + SLOT_BLOCK) of the example, which are real, and their rows
    (padding slots masked: never read)."""
    slot = start + tl.arange(0, SLOT_BLOCK)
    real = slot < pairs
    word = tl.load(words + example * width + slot, mask=real, other=0).to(tl.int64)
    u = tl.load(context_w + word[:, None] * DIM + d[None, :],
                mask=real[:, None] & in_dim[None, :], other=0.0)
    return slot, real, u


@triton.jit
def _forward(center_w, context_w, centers, words, num_contexts, scores, loss, width,
             num_negatives, DIM: tl.constexpr, SLOT_BLOCK: tl.constexpr,
             DIM_BLOCK: tl.constexpr):
    example, n, pairs, d, in_dim, v = _example(center_w, centers, num_contexts, num_negatives,
                                               DIM, DIM_BLOCK)
    total = tl.zeros([SLOT_BLOCK], dtype=tl.float32)
    for start in range(0, pairs, SLOT_BLOCK):
        slot, real, u = _slot_rows(context_w, words, example, width, start, pairs, d, in_dim,
                                   DIM, SLOT_BLOCK)
        score = tl.sum(u * v[None, :], axis=1)
        tl.store(scores + example * width + slot, score, mask=real)
        # BCE with logits: softplus(-x) for a context (label 1), softplus(x) for a negative.
        z = tl.where(slot < n, -score, score)
        softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        total += tl.where(real, softplus, 0.0)
    # The reference's mask.sum(1); at least 1 so that padding examples give 0, not 0/0.
    tl.store(loss + example, tl.sum(total, axis=0) / tl.maximum(pairs, 1).to(tl.float32))


@triton.jit
def _backward(center_w, context_w, centers, words, num_contexts, scores, grad_loss,
              center_position, word_position, grad_center, grad_context, width, num_negatives,
              DIM: tl.constexpr, SLOT_BLOCK: tl.constexpr, DIM_BLOCK: tl.constexpr):
    example, n, pairs, d, in_dim, v = _example(center_w, centers, num_contexts, num_negatives,
                                               DIM, DIM_BLOCK)
    scale = tl.load(grad_loss + example) / tl.maximum(pairs, 1).to(tl.float32)
    grad_v = tl.zeros([DIM_BLOCK], dtype=tl.float32)
    for start in range(0, pairs, SLOT_BLOCK):
        slot, real, u = _slot_rows(context_w, words, example, width, start, pairs, d, in_dim,
                                   DIM, SLOT_BLOCK)
        score = tl.load(scores + example * width + slot, mask=real, other=0.0)
        # d softplus(±x)/dx = sigmoid(x) - label.
        label = (slot < n).to(tl.float32)
        coefficient = tl.where(real, (tl.sigmoid(score) - label) * scale, 0.0)
        grad_v += tl.sum(coefficient[:, None] * u, axis=0)
        row = tl.load(word_position + example * width + slot, mask=real, other=0).to(tl.int64)
        tl.atomic_add(grad_context + row[:, None] * DIM + d[None, :],
                      coefficient[:, None] * v[None, :], mask=real[:, None] & in_dim[None, :],
                      sem="relaxed")
    row = tl.load(center_position + example).to(tl.int64)
    tl.atomic_add(grad_center + row * DIM + d, grad_v, mask=in_dim, sem="relaxed")


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read by Triton
    when it is first imported): the only way these kernels take CPU tensors."""
    return bool(triton.knobs.runtime.interpret)


def launch_shape(width: int, dim: int, on_cpu: bool) -> dict[str, int]:
    """The kernels' compile-time constants."""
    dim_block = triton.next_power_of_2(dim)
    if on_cpu:
        slots = triton.next_power_of_2(width)
    else:
        wider = max(dim_block // GPU_SLOT_BLOCK_WIDTH, 1)  # a power of 2, as both blocks are
        slots = max(GPU_SLOT_BLOCK // wider, 1)
    return {"DIM": dim, "SLOT_BLOCK": slots, "DIM_BLOCK": dim_block}


def launch_options() -> dict[str, int | bool]:
    """Triton's compile options: the warps (read at each call: the step profile varies them) and
    fused multiply-adds, named because Triton 3.10 turns them off by default (3.9 warns at the
    first compile that it will)."""
    return {"num_warps": GPU_NUM_WARPS, "enable_fp_fusion": True}


def launch(kernel: triton.JITFunction, batch: int, width: int, dim: int, on_cpu: bool,
           *args: Any) -> None:
    """One program per example of the batch."""
    kernel[(batch,)](*args, **launch_shape(width, dim, on_cpu), **launch_options())


class TritonSkipGramLoss(torch.autograd.Function):
    """Per-example loss (B,) of the padded batch; the static kernel's fixed-length gradients."""

    @staticmethod
    def forward(ctx: Any, center_weight: torch.Tensor, context_weight: torch.Tensor,
                centers: torch.Tensor, contexts_negatives: torch.Tensor,
                num_contexts: torch.Tensor, num_negatives: int) -> torch.Tensor:
        if center_weight.dtype != torch.float32 or context_weight.dtype != torch.float32:
            raise ValueError("the triton kernel takes float32 tables")
        center_weight, context_weight = center_weight.contiguous(), context_weight.contiguous()
        contexts_negatives = contexts_negatives.contiguous()
        batch, width = contexts_negatives.shape
        dim = center_weight.shape[1]
        on_cpu = center_weight.device.type != "cuda"
        if on_cpu and not interpreted():
            raise ValueError("the triton kernel runs on CUDA tables (on CPU tensors only under "
                             "TRITON_INTERPRET=1, Triton's interpreter)")
        scores = center_weight.new_empty((batch, width))  # padding slots: never written or read
        loss = center_weight.new_empty(batch)
        if batch:
            launch(_forward, batch, width, dim, on_cpu, center_weight, context_weight, centers,
                   contexts_negatives, num_contexts, scores, loss, width, num_negatives)
        ctx.num_negatives, ctx.on_cpu = num_negatives, on_cpu
        ctx.save_for_backward(center_weight, context_weight, centers, contexts_negatives,
                              num_contexts, scores)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        center_weight, context_weight, centers, contexts_negatives, num_contexts, scores = (
            ctx.saved_tensors)
        batch, width = contexts_negatives.shape
        dim = center_weight.shape[1]
        real = real_slot_mask(contexts_negatives, num_contexts, ctx.num_negatives)
        word_rows, word_position = static_slot_rows(contexts_negatives, real,
                                                    context_weight.shape[0])
        center_rows, center_position = static_unique_rows(centers, center_weight.shape[0])
        grad_context = context_weight.new_zeros((word_rows.shape[0], dim))
        grad_center = center_weight.new_zeros((center_rows.shape[0], dim))
        if batch:
            launch(_backward, batch, width, dim, ctx.on_cpu, center_weight, context_weight,
                   centers, contexts_negatives, num_contexts, scores, grad_output.contiguous(),
                   center_position, word_position, grad_center, grad_context, width,
                   ctx.num_negatives)
        return (row_sparse(center_rows, grad_center, center_weight.shape),
                row_sparse(word_rows, grad_context, context_weight.shape),
                None, None, None, None)
