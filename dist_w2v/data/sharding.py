"""Split an epoch's examples into global batches and each global batch across ranks.

This is the partition DistributedSampler would give, arranged so that results do not depend on
the world size: one seeded permutation of the epoch (``set_epoch`` reshuffles it) is cut into
global batches of ``batch_size`` examples, and rank r takes the r-th contiguous slice of each.
Every rank therefore runs the same number of steps, the shards are disjoint and together
complete, and W ranks see exactly the global batches that one process sees. The last, short
global batch is split as evenly as possible; when it has fewer examples than ranks, the ranks
past its end take an empty slice. An empty slice still joins the gradient exchange (its local
sparse gradient has no rows), so no example is dropped or repeated, unlike DistributedSampler's
padding, and the result does not depend on the world size at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_w2v.data.examples import epoch_seed
from dist_w2v.errors import UserError

# The shuffle's random stream, apart from the one that draws the epoch's examples.
SHUFFLE_STREAM = 7_919


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size != 0:
        raise UserError(
            f"train.batch_size={global_batch_size} is the global batch and must divide by the "
            f"world size {world_size}; pick a multiple of {world_size}"
        )
    return global_batch_size // world_size


@dataclass
class ShardPlan:
    """Which example indices every rank trains on, step by step, for one epoch."""

    permutation: torch.Tensor
    num_examples: int
    batch_size: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        self.num_steps = -(-self.num_examples // self.batch_size)

    def __len__(self) -> int:
        return self.num_steps

    def global_batch_bounds(self, step: int) -> tuple[int, int]:
        start = step * self.batch_size
        return start, min(start + self.batch_size, self.num_examples)

    def global_batch_size(self, step: int) -> int:
        start, stop = self.global_batch_bounds(step)
        return stop - start

    def rank_slice(self, step: int, rank: int) -> tuple[int, int]:
        """[lo, hi) inside the permutation: rank's part of global batch ``step``."""
        start, stop = self.global_batch_bounds(step)
        size = stop - start
        base, extra = divmod(size, self.world_size)
        lo = start + rank * base + min(rank, extra)
        return lo, lo + base + (1 if rank < extra else 0)

    def indices(self, step: int) -> torch.Tensor:
        lo, hi = self.rank_slice(step, self.rank)
        return self.permutation[lo:hi]


class EpochSharder:
    """The DistributedSampler of this project: seeded, reshuffled per epoch via set_epoch."""

    def __init__(self, seed: int, batch_size: int, world_size: int, rank: int,
                 device: torch.device):
        per_rank_batch_size(batch_size, world_size)
        self.seed = seed
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.device = device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, num_examples: int) -> ShardPlan:
        # The shuffle is drawn on the CPU so every rank and device agrees on it bit for bit.
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch, stream=SHUFFLE_STREAM))
        permutation = torch.randperm(num_examples, generator=g).to(self.device)
        return ShardPlan(permutation, num_examples, self.batch_size, self.world_size, self.rank)
