"""The stream: shards and chunks of a prepared corpus, every rank's part of every global batch.

Ranks run here in one process, one RankStream each. The one collective of the stream (the
all-reduce of the per-shard example counts) is given the totals of the one-process stream, after
checking that the rank counted exactly its own shards; tests/test_distributed.py runs the real
thing over gloo.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import prepare

from dist_w2v.config import DataConfig, load_config
from dist_w2v.data.examples import ExampleBuilder
from dist_w2v.data.stream import ChunkSource, RankStream, check_shards, plan_chunks
from dist_w2v.errors import UserError
from dist_w2v.parallel import env
from dist_w2v.train.loop import Trainer

CPU = torch.device("cpu")
BATCH = 96


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory, shared_small_corpus):
    """2,000 PTB sentences (about 33k tokens)."""
    return prepare(DataConfig(corpus=str(shared_small_corpus), min_count=5),
                   tmp_path_factory.mktemp("cache"))


def data_config(**overrides) -> DataConfig:
    return DataConfig(min_count=5, **{"shards": 4, "chunk_tokens": 2048, **overrides})


def make_streams(corpus, cfg: DataConfig, world_size: int, batch: int = BATCH, epoch: int = 0,
                 step: int = 0):
    """Every rank's stream positioned at (epoch, step), and the epoch's plan."""
    builder = ExampleBuilder(corpus.vocab, cfg, CPU)
    reference = RankStream(corpus, builder, cfg, 0, batch, 1, 0, lambda t: t)
    totals = reference.start_epoch(epoch).shard_examples.copy()
    reference.close()

    def all_sum(local: torch.Tensor) -> torch.Tensor:
        mine = local.numpy() != 0
        assert (local.numpy()[mine] == totals[mine]).all()
        return torch.as_tensor(totals)

    streams, plans = [], []
    for rank in range(world_size):
        stream = RankStream(corpus, builder, cfg, 0, batch, world_size, rank, all_sum)
        plans.append(stream.start_epoch(epoch, step))
        streams.append(stream)
    assert all(p.num_steps == plans[0].num_steps for p in plans)
    return streams, plans[0]


def rows(batch) -> list[tuple[int, ...]]:
    """A batch as a sorted list of its examples (center, then its padded row)."""
    table = torch.cat([batch.centers.long().unsqueeze(1), batch.contexts_negatives.long()], 1)
    return sorted(map(tuple, table.tolist()))


def global_batches(corpus, cfg: DataConfig, world_size: int, epoch: int = 0, step: int = 0):
    streams, plan = make_streams(corpus, cfg, world_size, epoch=epoch, step=step)
    batches = []
    for _ in range(step, plan.num_steps):
        parts = [stream.next_batch() for stream in streams]
        batches.append(sorted(r for part in parts for r in rows(part)))
    for stream in streams:
        stream.close()
    return batches, plan


def test_chunks_are_sentence_aligned_and_cover_the_corpus_once(prepared_ptb):
    plan = plan_chunks(prepared_ptb, shards=16, chunk_tokens=20_000)
    chunks = [chunk for shard in plan for chunk in shard]
    assert len(plan) == 16 and len(chunks) > 16
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].stop == prepared_ptb.num_tokens
    offsets = prepared_ptb.sentence_offsets
    for before, after in zip(chunks[:-1], chunks[1:], strict=True):
        assert before.stop == after.start and before.last_sentence == after.first_sentence
    for chunk in chunks:
        assert offsets[chunk.first_sentence] == chunk.start
        assert offsets[chunk.last_sentence] == chunk.stop
        assert chunk.stop - chunk.start <= 20_000 + 200  # a cut falls inside one sentence
    sizes = [shard[-1].stop - shard[0].start for shard in plan]
    assert max(sizes) - min(sizes) < 200  # shards are equal up to a sentence


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_the_world_size(small_prepared, world_size):
    one, plan = global_batches(small_prepared, data_config(), 1)
    many, _ = global_batches(small_prepared, data_config(), world_size)
    assert len(plan.shard_examples) == 4 and plan.num_steps > 50
    assert many == one


def test_two_ranks_visit_every_chunk_of_an_epoch_exactly_once(small_prepared, monkeypatch):
    cfg = data_config()
    built_by: dict[int, list[int]] = defaultdict(list)  # by ChunkSource
    build = ChunkSource.build

    def recording(source, chunk, epoch):
        built_by[id(source)].append(chunk.index)
        return build(source, chunk, epoch)

    monkeypatch.setattr(ChunkSource, "build", recording)  # first chunks start with the epoch
    streams, plan = make_streams(small_prepared, cfg, 2)
    built = [built_by[id(stream.source)] for stream in streams]
    examples = 0
    for step in range(plan.num_steps):
        sizes = [len(stream.next_batch()) for stream in streams]
        assert sum(sizes) == plan.global_batch_size(step)
        examples += sum(sizes)
    all_chunks = [c.index for shard in plan_chunks(small_prepared, 4, 2048) for c in shard]
    assert len(all_chunks) > 8  # several chunks per shard
    assert sorted(built[0] + built[1]) == all_chunks
    assert not set(built[0]) & set(built[1])
    assert examples == plan.num_examples  # nothing dropped or repeated
    for stream in streams:
        assert len(stream.next_batch()) == 0  # the streams are spent
        stream.close()


def two_epochs_as_the_trainer_reads_them(corpus, cfg: DataConfig, workers: int,
                                         background: bool):
    """Every batch of epochs 0 and 1 (epoch 1 prefetched after epoch 0's first batch, as the
    trainer does), and the time spans of chunk builds and of the "steps" between batches."""
    builder = ExampleBuilder(corpus.vocab, cfg, CPU)
    stream = RankStream(corpus, builder, cfg, 0, BATCH, 1, 0, lambda t: t, workers, background)
    builds, steps, batches = [], [], []
    build = stream.source.build

    def timed(chunk, epoch):
        began = time.perf_counter()
        built = build(chunk, epoch)
        time.sleep(0.002)  # long enough to be caught beside a step that would overlap it
        builds.append((began, time.perf_counter()))
        return built

    stream.source.build = timed
    for epoch in range(2):
        plan = stream.start_epoch(epoch)
        for step in range(plan.num_steps):
            batches.append(rows(stream.next_batch()))
            if epoch == 0 and step == 0:
                stream.prefetch(1)
            began = time.perf_counter()
            time.sleep(0.001)  # the step
            steps.append((began, time.perf_counter()))
    stream.close()
    return batches, builds, steps


def test_chunks_built_between_steps_on_several_threads_give_the_same_batches(small_prepared):
    """Where the step takes every core, chunks are built in bursts between steps, on several
    threads: the same batches as one thread building beside the step, and no build overlaps
    a step."""
    cfg = data_config()
    beside, _, _ = two_epochs_as_the_trainer_reads_them(small_prepared, cfg, 1, True)
    between, builds, steps = two_epochs_as_the_trainer_reads_them(small_prepared, cfg, 3, False)
    assert between == beside and len(builds) > 8
    overlapping = [(b, s) for b in builds for s in steps if b[0] < s[1] and s[0] < b[1]]
    assert not overlapping


def test_a_stream_started_mid_epoch_continues_the_same_batches(small_prepared):
    full, _ = global_batches(small_prepared, data_config(), 1, epoch=1)
    resumed, _ = global_batches(small_prepared, data_config(), 2, epoch=1, step=37)
    assert resumed == full[37:]


def test_epochs_reshuffle_and_resample(small_prepared):
    first, _ = global_batches(small_prepared, data_config(), 1, epoch=0)
    second, _ = global_batches(small_prepared, data_config(), 1, epoch=1)
    assert first[0] != second[0]
    fixed = data_config(resample_each_epoch=False)
    a, _ = global_batches(small_prepared, fixed, 1, epoch=0)
    b, _ = global_batches(small_prepared, fixed, 1, epoch=1)
    # d2l's draw-once: the same examples every epoch, in another order.
    assert sorted(r for batch in a for r in batch) == sorted(r for batch in b for r in batch)
    assert a[0] != b[0]


def test_the_tail_of_an_epoch_has_smaller_global_batches(small_prepared):
    _, plan = make_streams(small_prepared, data_config(), 1)
    sizes = np.array([plan.global_batch_size(t) for t in range(plan.num_steps)])
    assert sizes.sum() == plan.num_examples
    assert (sizes[:-1] >= sizes[1:]).all() and sizes[0] == BATCH and sizes[-1] > 0


@pytest.mark.parametrize("shards, batch, world_size, message", [
    (16, 512, 3, "data.shards=16 must divide by the world size 3"),
    (16, 100, 1, "train.batch_size=100 must divide by data.shards=16"),
])
def test_divisibility_is_checked_first(shards, batch, world_size, message):
    with pytest.raises(UserError, match=message):
        check_shards(DataConfig(shards=shards), batch, world_size)


def test_chunks_are_built_beside_the_step_only_where_it_leaves_a_core(monkeypatch):
    """A 4-core share: 3 step threads leave the builder a core (one thread, beside the step);
    4 take them all (builds between steps, on 4 threads); on CUDA always beside."""
    monkeypatch.setattr(env, "usable_cores", lambda: 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert env.chunk_builders(env.DistEnv()) == (1, True)
        torch.set_num_threads(4)
        assert env.chunk_builders(env.DistEnv()) == (4, False)
        assert env.chunk_builders(env.DistEnv(device=torch.device("cuda"))) == (1, True)
        torch.set_num_threads(2)  # two ranks on the node: a share of 2 each
        assert env.chunk_builders(env.DistEnv(local_world_size=2)) == (2, False)
    finally:
        torch.set_num_threads(threads)


def test_data_seed_alone_draws_the_examples_and_seed_alone_the_initial_tables(small_prepared,
                                                                               shared_small_corpus,
                                                                               tmp_path):
    """train.data_seed unset is train.seed; set, it moves every batch and no table, and
    train.seed then moves the tables and no batch."""
    def first_batch_and_tables(*overrides: str):
        cfg = load_config(None, [f"data.corpus={shared_small_corpus}", "data.min_count=5",
                                 "model.dim=8", f"train.batch_size={BATCH}", "train.threads=1",
                                 *overrides])
        trainer = Trainer(cfg, env.DistEnv(), tmp_path / "-".join(overrides), small_prepared)
        trainer.stream.start_epoch(0)
        batch = trainer.stream.next_batch()
        trainer.stream.close()
        return batch.centers, batch.contexts_negatives, trainer.model.center.weight.detach()

    def same(a, b) -> list[bool]:
        return [torch.equal(x, y) for x, y in zip(a, b, strict=True)]

    plain = first_batch_and_tables("train.seed=0")
    assert same(plain, first_batch_and_tables("train.seed=0", "train.data_seed=0")) == [True] * 3
    assert same(plain, first_batch_and_tables("train.seed=1", "train.data_seed=0")) == [
        True, True, False]
    assert same(plain, first_batch_and_tables("train.seed=0", "train.data_seed=1")) == [
        False, False, True]
