"""Row-sparse gradients whose shapes come from the batch's shape alone, never from its values.

A sparse gradient's row count is a host-side shape, so listing the rows a batch touches with
``unique``, ``nonzero`` or ``coalesce`` makes the host wait for the device to count them: a
sync per table and step, and a step that CUDA graphs cannot capture. Here every list of rows
has a length known in advance, ``min(ids, table rows)``: the touched rows, sorted and unique,
then padding entries that point at ``PAD_ROW`` with zero values.

Why zero-valued padding is exact: every update rule used here moves a row by nothing for a
zero gradient (SGD, capped SGD, row-wise Adagrad, dense-moment Adam's densified gradient), and
``PAD_ROW`` is ``<unk>`` (index 0), which training never touches (d2l drops unknown words from
the sentences and never draws index 0 as noise), so even SparseAdam's moments stay zero there.
Consumers must not assume unique rows: the padding repeats ``PAD_ROW``, and an all-gather across
ranks repeats real rows. ``sum_duplicate_rows`` sums them, again at a fixed length.
"""

from __future__ import annotations

import torch

PAD_ROW = 0

# Below this many ids per table row, sorting the ids beats flagging them in a table-sized vector
# (a huge vocabulary and a small batch); above it the flags are linear and cheaper.
SORT_BELOW_IDS_PER_ROW = 1 / 8


def static_unique_rows(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted unique ids padded with PAD_ROW to ``min(len(ids), num_rows)``, and each id's
    position among them (``torch.unique``'s inverse), with no value read back to the host."""
    ids = ids.reshape(-1).to(torch.int64)
    bound = min(ids.numel(), num_rows)
    if ids.numel() < SORT_BELOW_IDS_PER_ROW * num_rows:
        sorted_ids, order = torch.sort(ids)
        slot = _run_starts(sorted_ids).cumsum(0) - 1
        position = torch.empty_like(ids).scatter_(0, order, slot)
        rows = torch.full((bound,), PAD_ROW, dtype=torch.int64, device=ids.device)
        return rows.scatter_(0, slot, sorted_ids), position
    present = torch.zeros(num_rows, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
    position = (present.cumsum(0) - 1).index_select(0, ids)
    rows = torch.full((bound,), PAD_ROW, dtype=torch.int64, device=ids.device)
    return rows.scatter_(0, position, ids), position


def real_slot_mask(contexts_negatives: torch.Tensor, num_contexts: torch.Tensor,
                   num_negatives: int) -> torch.Tensor:
    """(B, L) bool: the slots the reference's mask keeps, ``num_contexts · (1 + K)`` per example."""
    slots = torch.arange(contexts_negatives.shape[1], device=contexts_negatives.device)
    return slots < num_contexts.to(torch.int64).unsqueeze(1) * (1 + num_negatives)


def static_slot_rows(words: torch.Tensor, real: torch.Tensor,
                     num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context rows a padded (B, L) batch touches, at a fixed length (static_unique_rows),
    and each slot's position among them; a padding slot's position is its example's first
    context's, so that it points at a row the example really touches.

    Padding slots (about half of PTB's) hold word 0. Listed as such, every one would write the
    same flag and row entry: a hot spot on a GPU."""
    words = words.to(torch.int64)
    listed = torch.where(real, words, words[:, :1])
    return static_unique_rows(listed, num_rows)


def sum_duplicate_rows(rows: torch.Tensor,
                       values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``coalesce`` at a fixed length: each row once (sorted) with its values summed, then
    PAD_ROW entries with zero values up to ``len(rows)``.

    The PAD_ROW entries (a padded list's tail; a 1M-word table's list at B=16,384 is mostly
    padding) keep one slot each, at the end: summed into one slot, they would be one row that
    hundreds of thousands of atomic adds wait on, on a GPU."""
    sorted_rows, order = torch.sort(rows)
    padding = sorted_rows == PAD_ROW  # PAD_ROW is the smallest id: a prefix of the sorted rows
    first_of_row = _run_starts(sorted_rows).masked_fill_(padding, 0)
    entry = torch.arange(rows.numel(), device=rows.device)
    slot = torch.where(padding, rows.numel() - 1 - entry, first_of_row.cumsum(0) - 1)
    summed = torch.zeros_like(values).index_add_(0, slot, values.index_select(0, order))
    unique = torch.full_like(rows, PAD_ROW).scatter_(0, slot, sorted_rows)
    return unique, summed


def _run_starts(sorted_ids: torch.Tensor) -> torch.Tensor:
    """1 where a sorted id differs from the one before it (and at the first), else 0."""
    starts = torch.ones_like(sorted_ids)
    if sorted_ids.numel() > 1:
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return starts


def row_sparse(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (V, D) sparse gradient from listed rows that may repeat (not flagged coalesced)."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=False)
