"""Each rank streams its share of a prepared corpus: shards, chunks, and the global batches.

The corpus (a memory-mapped token file, data/prepared.py) is cut into S virtual shards, S
contiguous, sentence-aligned stretches of about equal length, and every shard into
sentence-aligned chunks of at most ``data.chunk_tokens`` tokens. Each epoch:

* ``DistributedSampler`` over the shard indices (shuffle, seed, ``set_epoch``) gives rank r of W
  the shards it reads (W must divide S). A rank never touches another rank's tokens.
* Every shard is a stream of its own: its chunks in a seeded order, each chunk's examples
  (data/examples.py, seeded by (seed, epoch, chunk)) in a seeded order.
* Global batch t takes examples [t·b, (t+1)·b) of every shard's stream, b = B / S. A rank's
  part is what its shards give, so 1 process and W processes train exactly the same global
  batches (the result does not depend on the number of GPUs), and each rank builds only S/W of
  them.
* Every rank takes T = max over shards of ceil(N_s / b) steps, N_s being shard s's example
  count. Before the epoch each rank counts its shards' examples (the subsampling draw alone)
  and one all-reduce tells every rank all N_s, so each step's global batch size is known on
  the host without a per-step sync: a shard that runs out simply contributes nothing, so no
  example is dropped or repeated and no collective hangs.
* The next chunk of every shard is built on a background thread while the current one trains.

A position in the stream is (epoch, step): everything else above is a pure function of it, so
a checkpoint that records them resumes exactly, at any world size.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from dist_w2v.config import DataConfig
from dist_w2v.data.examples import Batch, ChunkExamples, ExampleBuilder, seeded_generator
from dist_w2v.data.prepared import PreparedCorpus
from dist_w2v.errors import UserError

# Purposes of the random streams, so that no two draws share a seed.
EXAMPLES, CHUNK_ORDER, EXAMPLE_ORDER = 1, 2, 3


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, stop) of the corpus: whole sentences, the ``sentences`` [first, last)."""

    index: int
    start: int
    stop: int
    first_sentence: int
    last_sentence: int


def cut_at_sentences(offsets: np.ndarray, first: int, last: int, pieces: int) -> list[int]:
    """Sentence numbers that cut sentences [first, last) into ``pieces`` stretches of about
    equal token counts (by binary search on the boundaries, never a scan of the corpus)."""
    start, stop = int(offsets[first]), int(offsets[last])
    targets = start + (stop - start) * np.arange(1, pieces) / pieces
    cuts = np.searchsorted(offsets[first:last + 1], targets, side="left") + first
    return [first, *np.clip(cuts, first, last).tolist(), last]


def plan_chunks(corpus: PreparedCorpus, shards: int, chunk_tokens: int) -> list[list[Chunk]]:
    """Every shard's chunks, in corpus order; chunk indices are global."""
    offsets = corpus.sentence_offsets
    shard_cuts = cut_at_sentences(offsets, 0, corpus.num_sentences, shards)
    plan: list[list[Chunk]] = []
    index = 0
    for first, last in zip(shard_cuts[:-1], shard_cuts[1:], strict=True):
        tokens = int(offsets[last]) - int(offsets[first])
        pieces = max(1, -(-tokens // chunk_tokens))
        cuts = sorted(set(cut_at_sentences(offsets, first, last, pieces)))
        chunks = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            chunks.append(Chunk(index, int(offsets[a]), int(offsets[b]), a, b))
            index += 1
        plan.append(chunks)
    return plan


def whole_corpus(corpus: PreparedCorpus) -> Chunk:
    """The whole corpus as one chunk: a whole epoch's examples at once (benchmarks, tests)."""
    return Chunk(0, 0, corpus.num_tokens, 0, corpus.num_sentences)


def check_shards(cfg: DataConfig, batch_size: int, world_size: int) -> None:
    """The divisibility rules, checked before any data is read."""
    if cfg.shards % world_size != 0:
        raise UserError(f"data.shards={cfg.shards} must divide by the world size {world_size}; "
                        f"pick a multiple of {world_size}")
    if batch_size % cfg.shards != 0:
        raise UserError(f"train.batch_size={batch_size} must divide by data.shards={cfg.shards} "
                        "(every global batch takes an equal share of every shard); pick a "
                        f"multiple of {cfg.shards}")


class ChunkSource:
    """Reads chunks from the memory-mapped corpus and builds their examples on the device."""

    def __init__(self, corpus: PreparedCorpus, builder: ExampleBuilder, seed: int,
                 resample_each_epoch: bool):
        self.corpus = corpus
        self.builder = builder
        self.device = builder.device
        self.seed = seed
        self.resample_each_epoch = resample_each_epoch

    def tokens(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's token ids (int32) and each token's sentence number, on the device."""
        # Boundaries first: read_sentence_offsets refuses a damaged file before its numbers
        # decide which tokens are read.
        bounds = self.corpus.read_sentence_offsets(chunk.first_sentence, chunk.last_sentence)
        ids = torch.from_numpy(self.corpus.read_tokens(int(bounds[0]), int(bounds[-1])))
        # numpy, not torch: on CPU this runs beside the training step, and a torch op here
        # would start an OpenMP team of its own on the step's cores.
        sentences = torch.from_numpy(np.repeat(np.arange(len(bounds) - 1), np.diff(bounds)))
        return ids.to(self.device), sentences.to(self.device)

    def generator(self, chunk: Chunk, epoch: int) -> torch.Generator:
        drawn_in = epoch if self.resample_each_epoch else 0  # d2l: one draw for every epoch
        return seeded_generator(self.device, self.seed, drawn_in, chunk.index, EXAMPLES)

    def count(self, chunk: Chunk, epoch: int) -> int:
        return self.builder.count(*self.tokens(chunk), self.generator(chunk, epoch))

    def build(self, chunk: Chunk, epoch: int) -> tuple[ChunkExamples, torch.Tensor]:
        """The chunk's examples and the order its stream takes them in."""
        examples = self.builder.build(*self.tokens(chunk), self.generator(chunk, epoch))
        g = seeded_generator(torch.device("cpu"), self.seed, epoch, chunk.index, EXAMPLE_ORDER)
        order = torch.randperm(len(examples), generator=g).to(self.device)
        return examples, order


class Prefetcher:
    """Builds chunks on background threads; on CUDA on a side stream of its own.

    ``background=False`` (CPU, when the step's threads take every core): work still goes to
    the pool, but :meth:`settle` waits for all of it before the next step, so builds run in
    bursts on all ``workers`` while the step waits, instead of beside it. A build beside a
    step that fills the cores stalls each of the step's parallel loops, which wait for their
    slowest thread: on the 2-core dev machine it cost the step about twice the build's time.
    """

    def __init__(self, device: torch.device, workers: int = 1, background: bool = True):
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.workers = workers
        self.background = background
        self._unsettled: list[concurrent.futures.Future] = []

    @property
    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads, started on first use (again after :meth:`close`)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="chunk-build")
        return self._pool

    def _track(self, future: concurrent.futures.Future) -> concurrent.futures.Future:
        if not self.background:
            self._unsettled.append(future)
        return future

    def settle(self) -> None:
        """Without background building: wait until all submitted work is done."""
        if self._unsettled:
            concurrent.futures.wait(self._unsettled)
            self._unsettled.clear()

    def submit(self, build: Callable[[], tuple[ChunkExamples, torch.Tensor]]
               ) -> concurrent.futures.Future:
        return self._track(self.pool.submit(self._run, build))

    def submit_plain(self, work: Callable[[], object]) -> concurrent.futures.Future:
        """Work whose result is host data (counts): on the side stream too, so that it never
        waits for the training stream (the legacy default stream would)."""
        def run() -> object:
            if self.side is None:
                return work()
            with torch.cuda.stream(self.side):
                return work()
        return self._track(self.pool.submit(run))

    def _run(self, build: Callable[[], tuple[ChunkExamples, torch.Tensor]]):
        if self.side is None:
            return build(), None
        with torch.cuda.stream(self.side):
            built = build()
            done = torch.cuda.Event()
            done.record(self.side)
        return built, done

    def receive(self, future: concurrent.futures.Future) -> tuple[ChunkExamples, torch.Tensor]:
        (examples, order), done = future.result()
        if done is not None:
            current = torch.cuda.current_stream(examples.centers.device)
            current.wait_event(done)
            for t in (examples.centers, examples.contexts_negatives, examples.num_contexts,
                      order):
                t.record_stream(current)  # freed tensors are reused only after our kernels
        return examples, order

    def close(self) -> None:
        self._unsettled.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class ShardStream:
    """One shard's examples for one epoch, taken b at a time across its chunks."""

    def __init__(self, chunks: list[Chunk], counts: list[int], source: ChunkSource,
                 prefetcher: Prefetcher, epoch: int,
                 first: concurrent.futures.Future | None = None):
        self.chunks, self.counts = chunks, counts
        self.source, self.prefetcher, self.epoch = source, prefetcher, epoch
        self.next_chunk = 0  # the chunk to load next
        self.current: tuple[ChunkExamples, torch.Tensor] | None = None
        self.cursor = 0  # position in the current chunk (or, before one is loaded, the next)
        # A build already under way, as (chunk position, future): the next chunk's.
        self.pending = (0, first) if first is not None else None

    def seek(self, position: int) -> None:
        """Skip the first ``position`` examples of the stream (a resumed epoch)."""
        ends = np.cumsum(self.counts)
        chunk = int(np.searchsorted(ends, position, side="right"))
        self.next_chunk = chunk
        self.cursor = position - (int(ends[chunk - 1]) if chunk > 0 else 0)
        self.current = None

    def _submit(self, position: int) -> concurrent.futures.Future:
        chunk = self.chunks[position]
        return self.prefetcher.submit(lambda: self.source.build(chunk, self.epoch))

    def _load_next(self) -> bool:
        """Make the next non-empty chunk current (its successor starts building); False at the
        end of the stream."""
        if self.current is not None:
            self.cursor = 0
        while self.next_chunk < len(self.chunks):
            position = self.next_chunk
            self.next_chunk += 1
            if self.pending is not None and self.pending[0] == position:
                future = self.pending[1]
            else:
                future = self._submit(position)
            self.pending = None
            if self.next_chunk < len(self.chunks):
                self.pending = (self.next_chunk, self._submit(self.next_chunk))
            self.current = self.prefetcher.receive(future)
            if len(self.current[0]) != self.counts[position]:
                raise RuntimeError(f"chunk {self.chunks[position].index} built "
                                   f"{len(self.current[0])} examples but counted "
                                   f"{self.counts[position]}")
            if self.cursor < len(self.current[0]):
                return True
            self.cursor = 0
        self.current = None
        return False

    def take(self, n: int) -> list[tuple[ChunkExamples, torch.Tensor]]:
        """The next ``n`` examples (fewer at the end), as (chunk examples, row indices) pieces."""
        pieces = []
        while n > 0:
            if (self.current is None or self.cursor >= len(self.current[0])) and (
                    not self._load_next()):
                break
            examples, order = self.current
            stop = min(self.cursor + n, len(examples))
            pieces.append((examples, order[self.cursor:stop]))
            n -= stop - self.cursor
            self.cursor = stop
        return pieces


@dataclass
class EpochStart:
    """Work on an epoch that can begin before it does: counting, and the first chunks."""

    shards: list[int]
    chunks: list[list[Chunk]]
    counts: concurrent.futures.Future  # of list[list[int]]
    first_chunks: list[concurrent.futures.Future | None]


@dataclass
class EpochPlan:
    """What every rank knows about one epoch before its first step."""

    epoch: int
    shard_examples: np.ndarray  # (S,) examples of every shard (all ranks')
    per_shard_batch: int

    @property
    def num_steps(self) -> int:
        return int(-(-self.shard_examples.max() // self.per_shard_batch)) if len(
            self.shard_examples) else 0

    @property
    def num_examples(self) -> int:
        return int(self.shard_examples.sum())

    def global_batch_size(self, step: int) -> int:
        left = self.shard_examples - step * self.per_shard_batch
        return int(np.clip(left, 0, self.per_shard_batch).sum())


class RankStream:
    """This rank's view of the stream: its shards, its epoch plans, its local batches."""

    def __init__(self, corpus: PreparedCorpus, builder: ExampleBuilder, cfg: DataConfig,
                 seed: int, batch_size: int, world_size: int, rank: int,
                 all_sum: Callable[[torch.Tensor], torch.Tensor], build_workers: int = 1,
                 build_in_background: bool = True):
        check_shards(cfg, batch_size, world_size)
        self.source = ChunkSource(corpus, builder, seed, cfg.resample_each_epoch)
        self.shards = plan_chunks(corpus, cfg.shards, cfg.chunk_tokens)
        self.sampler = DistributedSampler(range(cfg.shards), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)
        self.per_shard_batch = batch_size // cfg.shards
        self.seed = seed
        self.all_sum = all_sum
        self.prefetcher = Prefetcher(builder.device, build_workers, build_in_background)
        self.streams: list[ShardStream] = []
        self._early: dict[int, EpochStart] = {}

    def my_shards(self, epoch: int) -> list[int]:
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def chunk_order(self, shard: int, epoch: int) -> list[Chunk]:
        chunks = self.shards[shard]
        g = seeded_generator(torch.device("cpu"), self.seed, epoch, shard, CHUNK_ORDER)
        return [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]

    def _begin(self, epoch: int, with_first_chunks: bool) -> EpochStart:
        shards = self.my_shards(epoch)
        chunks = [self.chunk_order(shard, epoch) for shard in shards]
        counts = self.prefetcher.submit_plain(
            lambda: [[self.source.count(c, epoch) for c in order] for order in chunks])
        first = [self.prefetcher.submit(lambda c=order[0]: self.source.build(c, epoch))
                 if with_first_chunks and order else None for order in chunks]
        return EpochStart(shards, chunks, counts, first)

    def prefetch(self, epoch: int) -> None:
        """Start counting ``epoch`` and building its first chunks in the background (call it
        once the current epoch's own chunks are under way)."""
        if epoch not in self._early:
            self._early[epoch] = self._begin(epoch, with_first_chunks=True)
            self.prefetcher.settle()

    def start_epoch(self, epoch: int, step: int = 0) -> EpochPlan:
        """Count this rank's shards, learn everyone's counts, and position at ``step``."""
        begun = self._early.pop(epoch, None)
        for stale in self._early.values():  # another epoch's prefetch (a jump on resume)
            for future in stale.first_chunks:
                if future is not None:
                    future.cancel()
        self._early.clear()
        if begun is None or step > 0:
            # From the start of an epoch every shard needs its first chunk: all at once, so
            # that several build threads can share them.
            begun = self._begin(epoch, with_first_chunks=step == 0)
        counts = begun.counts.result()
        shard_examples = torch.zeros(len(self.shards), dtype=torch.int64)
        self.streams = []
        for shard, chunks, chunk_counts, first in zip(begun.shards, begun.chunks, counts,
                                                      begun.first_chunks, strict=True):
            shard_examples[shard] = sum(chunk_counts)
            stream = ShardStream(chunks, chunk_counts, self.source, self.prefetcher, epoch,
                                 first)
            stream.seek(step * self.per_shard_batch)
            self.streams.append(stream)
        totals = self.all_sum(shard_examples.to(self.source.device)).cpu().numpy()
        return EpochPlan(epoch, totals, self.per_shard_batch)

    def next_batch(self) -> Batch:
        """This rank's part of the next global batch (possibly empty at the epoch's tail)."""
        pieces = [p for stream in self.streams for p in stream.take(self.per_shard_batch)]
        self.prefetcher.settle()  # the next chunks, where they are not built beside the step
        if not pieces:
            return self.empty_batch()
        return Batch(
            centers=torch.cat([ex.centers.index_select(0, rows) for ex, rows in pieces]),
            contexts_negatives=torch.cat([ex.contexts_negatives.index_select(0, rows)
                                          for ex, rows in pieces]),
            num_contexts=torch.cat([ex.num_contexts.index_select(0, rows) for ex, rows in pieces]),
            num_negatives=self.source.builder.cfg.num_negatives,
        )

    def empty_batch(self) -> Batch:
        builder = self.source.builder
        device = builder.device
        return Batch(
            centers=torch.zeros(0, dtype=torch.int32, device=device),
            contexts_negatives=torch.zeros((0, builder.width), dtype=torch.int32, device=device),
            num_contexts=torch.zeros(0, dtype=torch.int64, device=device),
            num_negatives=builder.cfg.num_negatives,
        )

    def close(self) -> None:
        self.prefetcher.close()
