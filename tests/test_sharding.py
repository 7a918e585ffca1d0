"""Sharding: every rank's part of every global batch, for world sizes 1, 2 and 3."""

from __future__ import annotations

import pytest
import torch

from dist_w2v.data.sharding import EpochSharder, per_rank_batch_size
from dist_w2v.errors import UserError

CPU = torch.device("cpu")
BATCH = 96  # divides by 1, 2 and 3


def rank_plans(num_examples: int, world_size: int, epoch: int = 0, seed: int = 0):
    plans = []
    for rank in range(world_size):
        sharder = EpochSharder(seed, BATCH, world_size, rank, CPU)
        sharder.set_epoch(epoch)
        plans.append(sharder.plan(num_examples))
    return plans


def shards(num_examples: int, world_size: int, epoch: int = 0) -> list[list[torch.Tensor]]:
    """shards[rank][step]: the example indices that rank trains on at that step."""
    return [[plan.indices(step) for step in range(len(plan))]
            for plan in rank_plans(num_examples, world_size, epoch)]


# 960 fills 10 global batches exactly; 1000 leaves a short last batch of 40 (splits unevenly
# over 3 ranks); 961 leaves a last batch of 1 example, fewer than the ranks of a 2- or 3-rank run.
@pytest.mark.parametrize("num_examples", [960, 1000, 961])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_complete_and_equal_in_steps(num_examples, world_size):
    per_rank = shards(num_examples, world_size)
    steps = {len(rank_steps) for rank_steps in per_rank}
    assert steps == {-(-num_examples // BATCH)}, "every rank must take the same number of steps"
    everything = torch.cat([idx for rank_steps in per_rank for idx in rank_steps])
    assert everything.numel() == num_examples, "an example was dropped or repeated"
    assert torch.equal(everything.sort().values, torch.arange(num_examples))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_see_exactly_the_single_process_global_batches(world_size):
    single = shards(1000, 1)[0]
    per_rank = shards(1000, world_size)
    for step, global_batch in enumerate(single):
        parts = [per_rank[rank][step] for rank in range(world_size)]
        assert torch.equal(torch.cat(parts), global_batch)
        sizes = [p.numel() for p in parts]
        assert max(sizes) - min(sizes) <= 1, "a global batch must be split as evenly as possible"


def test_last_batch_smaller_than_world_leaves_later_ranks_an_empty_slice():
    per_rank = shards(961, 3)
    assert [per_rank[rank][-1].numel() for rank in range(3)] == [1, 0, 0]


def test_set_epoch_reshuffles_and_a_seed_repeats():
    first, again = shards(1000, 2, epoch=0), shards(1000, 2, epoch=0)
    second = shards(1000, 2, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0], strict=True))
    assert not torch.equal(first[0][0], second[0][0])
    other_seed = EpochSharder(1, BATCH, 1, 0, CPU).plan(1000).indices(0)
    assert not torch.equal(shards(1000, 1)[0][0], other_seed)


def test_global_batch_must_divide_by_world_size():
    assert per_rank_batch_size(96, 3) == 32
    with pytest.raises(UserError, match=r"train.batch_size=100 .* world size 3.* multiple of 3"):
        EpochSharder(0, 100, 3, 0, CPU)
