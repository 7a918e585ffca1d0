"""The fused CPU kernel of the fast path: word2vec's own inner loop, compiled by numba.

The CSR kernel (fast_path.py) spends most of a step outside arithmetic: listing the real pairs,
building and sorting sparse patterns, and one pass over the pairs per product. Here one
compiled loop per pass walks the padded batch directly, as word2vec.c and gensim do:

* forward, parallel over examples: each real pair's dot product v·u, its loss, its error
  e = sigmoid(v·u) - label, and the example's h = Σ e·u while u is still in cache;
* backward: the center gradient is h scaled by the example's weight; each context row's
  gradient Σ e·weight·v is reduced by the thread that owns the row (rows are dealt to threads
  by position), so no two threads write one row and the sum order is fixed: results do not
  depend on scheduling.

Gradients come back as the fast path's: sparse COO rows, unique and sorted, flagged coalesced.
numba (a maintained JIT with a parallel loop construct, wheels on every platform torch has)
replaces a C++ extension that would need a compiler on every user's machine. Compiled code is
cached beside this file, so only the first process on a machine pays the ~10 s compile.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

from dist_w2v.model.fast_path import row_gradient

# Reassociation lets LLVM vectorise the dot products (16 floats at a time); no 'nnan'/'ninf',
# so a diverging run still produces the NaN the trainer stops on.
FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True)
def _unique_sorted(ids: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values of ``ids`` and each id's position among them."""
    count = ids.shape[0]
    position = np.full(num_rows, -1, dtype=np.int32)
    found = np.empty(count, dtype=np.int64)
    unique = 0
    for p in range(count):
        w = ids[p]
        if position[w] < 0:
            position[w] = 0
            found[unique] = w
            unique += 1
    rows = np.sort(found[:unique])
    for r in range(unique):
        position[rows[r]] = r
    positions = np.empty(count, dtype=np.int32)
    for p in range(count):
        positions[p] = position[ids[p]]
    return rows, positions


@numba.njit(cache=True, nogil=True)
def _pair_words(contexts_negatives: np.ndarray, pair_offsets: np.ndarray) -> np.ndarray:
    """The words of the real pairs, example after example (slots [0, n_i(1+K)) of each row)."""
    words = np.empty(pair_offsets[-1], dtype=np.int64)
    for i in range(contexts_negatives.shape[0]):
        start = pair_offsets[i]
        for j in range(pair_offsets[i + 1] - start):
            words[start + j] = contexts_negatives[i, j]
    return words


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _score_pair(v, u, h, is_context):
    """One pair: its BCE-with-logits loss and error sigmoid(v·u) - label; adds error·u to h.

    softplus(-x) for a context, softplus(x) for a noise word, and the sigmoid, in their stable
    forms from one exp of -|x|, in the table's dtype.
    """
    one = v.dtype.type(1)
    score = v.dtype.type(0)
    for d in range(v.shape[0]):
        score += v[d] * u[d]
    z = np.exp(-abs(score))
    loss = np.log1p(z)
    if (score > 0) != is_context:
        loss += abs(score)
    sigmoid = one / (one + z) if score >= 0 else z / (one + z)
    error = sigmoid - one if is_context else sigmoid
    for d in range(v.shape[0]):
        h[d] += error * u[d]
    return loss, error


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _forward(center_weight, context_weight, centers, words, num_contexts, pair_offsets):
    """Per-example loss sums, each pair's error, and h_i = Σ error·u (parallel over examples)."""
    size = centers.shape[0]
    loss = np.zeros(size, dtype=np.float64)
    error = np.empty(words.shape[0], dtype=center_weight.dtype)
    hidden = np.zeros((size, center_weight.shape[1]), dtype=center_weight.dtype)
    for i in numba.prange(size):
        v = center_weight[centers[i]]
        contexts_end = pair_offsets[i] + num_contexts[i]
        for p in range(pair_offsets[i], pair_offsets[i + 1]):
            pair_loss, e = _score_pair(v, context_weight[words[p]], hidden[i], p < contexts_end)
            loss[i] += pair_loss
            error[p] = e
    return loss, error, hidden


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _context_gradient(center_weight, centers, word_positions, error, example_weight,
                      pair_offsets, num_word_rows, num_threads):
    """Σ over pairs of error·weight·v into one row per unique word. Thread t takes the rows
    r ≡ t (mod threads) as it walks all pairs: no two threads write a row, and every row sums
    in pair order, so the result does not depend on scheduling."""
    dim = center_weight.shape[1]
    # Rows padded to whole 64-byte cache lines: neighbouring rows belong to other threads,
    # and a line they shared would bounce between the cores at every write.
    padded = -(-dim // 16) * 16
    grad = np.zeros((num_word_rows, padded), dtype=center_weight.dtype)
    for t in numba.prange(num_threads):
        for i in range(centers.shape[0]):
            v = center_weight[centers[i]]
            weight = example_weight[i]
            for p in range(pair_offsets[i], pair_offsets[i + 1]):
                r = word_positions[p]
                if r % num_threads != t:
                    continue
                scale = error[p] * weight
                g = grad[r]
                for d in range(dim):
                    g[d] += scale * v[d]
    return np.ascontiguousarray(grad[:, :dim])


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def _center_gradient(hidden, example_weight, center_positions, num_center_rows, num_threads):
    """Σ over examples of weight·h into one row per unique center; thread t owns rows ≡ t."""
    dim = hidden.shape[1]
    grad = np.zeros((num_center_rows, dim), dtype=hidden.dtype)
    for t in numba.prange(num_threads):
        for i in range(hidden.shape[0]):
            r = center_positions[i]
            if r % num_threads != t:
                continue
            weight = example_weight[i]
            g = grad[r]
            h = hidden[i]
            for d in range(dim):
                g[d] += weight * h[d]
    return grad


def numba_threads() -> int:
    """numba's parallel loops follow torch's intra-op thread count (train.threads).

    Launching numba's OpenMP pool (at its first parallel call) resets the process's OpenMP
    thread count, which torch reads as its own: torch's count is restored after, or every
    run would silently go on with one thread per core.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool, once
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _sparse_rows(rows: np.ndarray, values: np.ndarray, shape: torch.Size) -> torch.Tensor:
    return row_gradient(torch.from_numpy(rows), torch.from_numpy(values), shape)


class FusedSkipGramLoss(torch.autograd.Function):
    """Per-example loss (B,) of the padded batch; coalesced sparse gradients for both tables."""

    @staticmethod
    def forward(ctx: Any, center_weight: torch.Tensor, context_weight: torch.Tensor,
                centers: torch.Tensor, contexts_negatives: torch.Tensor,
                num_contexts: torch.Tensor, num_negatives: int) -> torch.Tensor:
        numba_threads()
        v_table, u_table = _numpy(center_weight), _numpy(context_weight)
        centers_np = _numpy(centers).astype(np.int64, copy=False)
        n = _numpy(num_contexts).astype(np.int64, copy=False)
        pair_counts = n * (1 + num_negatives)
        pair_offsets = np.zeros(n.shape[0] + 1, dtype=np.int64)
        np.cumsum(pair_counts, out=pair_offsets[1:])
        words = _pair_words(_numpy(contexts_negatives), pair_offsets)
        loss, error, hidden = _forward(v_table, u_table, centers_np, words, n, pair_offsets)
        pair_counts = pair_counts.astype(v_table.dtype)
        ctx.saved = (v_table, centers_np, words, pair_offsets, error, hidden, pair_counts)
        ctx.shapes = (center_weight.shape, context_weight.shape)
        return torch.from_numpy((loss / pair_counts).astype(v_table.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        v_table, centers_np, words, pair_offsets, error, hidden, pair_counts = ctx.saved
        threads = numba_threads()
        # d(loss_i)/d(pair score) = error / pair count of example i, times the caller's weight.
        example_weight = _numpy(grad_output).astype(v_table.dtype, copy=False) / pair_counts
        center_shape, context_shape = ctx.shapes
        word_rows, word_positions = _unique_sorted(words, context_shape[0])
        center_rows, center_positions = _unique_sorted(centers_np, center_shape[0])
        grad_u = _context_gradient(v_table, centers_np, word_positions, error, example_weight,
                                   pair_offsets, word_rows.shape[0], threads)
        grad_v = _center_gradient(hidden, example_weight, center_positions,
                                  center_rows.shape[0], threads)
        return (_sparse_rows(center_rows, grad_v, center_shape),
                _sparse_rows(word_rows, grad_u, context_shape), None, None, None, None)
