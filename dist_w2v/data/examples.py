"""Skip-gram examples of one chunk of sentences, built with tensor operations on the device.

Everything d2l 14.3 does per token in Python (subsampling, random windows, negatives with
rejection of the center's contexts, the padded layout) is done here as whole-array operations
over a chunk (data/stream.py cuts the corpus into sentence-aligned chunks). A chunk's examples
are a pure function of its tokens and its random generator, which stream.py seeds from (seed,
epoch, chunk), so a resumed or restarted run rebuilds them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_w2v.config import DataConfig
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError

# Rejected negatives are redrawn in rounds over the rows that clashed. PTB settles in 3-4
# rounds; the bound only stops a vocabulary too small to ever avoid the contexts.
MAX_REJECTION_ROUNDS = 64


@dataclass
class ChunkExamples:
    """The padded layout of d2l 14.3, one row per center word.

    ``contexts_negatives[i]`` holds the n_i contexts, then n_i*K negatives, then 0-padding, in
    L = 2·max_window·(1+K) slots. ``mask`` and ``label`` follow from ``num_contexts`` alone.
    """

    centers: torch.Tensor  # (N,) int32
    contexts_negatives: torch.Tensor  # (N, L) int32
    num_contexts: torch.Tensor  # (N,) int64
    num_negatives: int

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    @property
    def width(self) -> int:
        return int(self.contexts_negatives.shape[1])

    @property
    def num_pairs(self) -> int:
        return int(self.num_contexts.sum())

    def batch(self, index: torch.Tensor) -> Batch:
        n = self.num_contexts.index_select(0, index)
        return Batch(
            centers=self.centers.index_select(0, index),
            contexts_negatives=self.contexts_negatives.index_select(0, index),
            num_contexts=n,
            num_negatives=self.num_negatives,
        )


@dataclass
class Batch:
    centers: torch.Tensor  # (B,)
    contexts_negatives: torch.Tensor  # (B, L)
    num_contexts: torch.Tensor  # (B,)
    num_negatives: int

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    def padded_to(self, size: int) -> Batch:
        """The batch with examples that score nothing (center 0, no contexts) appended up to
        ``size`` rows: one shape for every step and every rank, the static kernel's input. The
        padded reference path would divide by their zero pair count; only the static kernel
        takes them."""
        missing = size - len(self)
        if missing < 0:
            raise ValueError(f"a batch of {len(self)} examples cannot be padded to {size}")
        if missing == 0:
            return self
        return Batch(
            centers=torch.cat([self.centers, self.centers.new_zeros(missing)]),
            contexts_negatives=torch.cat([self.contexts_negatives, self.contexts_negatives
                                          .new_zeros((missing, self.contexts_negatives.shape[1]))]),
            num_contexts=torch.cat([self.num_contexts, self.num_contexts.new_zeros(missing)]),
            num_negatives=self.num_negatives,
        )

    def mask_and_label(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.contexts_negatives.shape[1]
        return mask_and_label(self.num_contexts, width, self.num_negatives)


def mask_and_label(
    num_contexts: torch.Tensor, width: int, num_negatives: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """d2l's (B, L) float mask (1 on real slots) and label (1 on contexts) of the padded layout."""
    slots = torch.arange(width, device=num_contexts.device)
    n = num_contexts.unsqueeze(1)
    mask = (slots < n * (1 + num_negatives)).float()
    label = (slots < n).float()
    return mask, label


def stream_seed(*keys: int) -> int:
    """A 63-bit seed of its own for every tuple of keys, e.g. (seed, epoch, chunk, purpose)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(2,
               dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*keys))
    return g


def compiled_seed(g: torch.Generator) -> int:
    """The compiled builder's seed, drawn from the chunk's generator (so count and build,
    given generators in the same state, replay the same draws)."""
    return int(torch.randint(0, 2**62, (1,), generator=g))


def alias_table(distribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: draw column i uniformly, keep it with probability[i], else alias[i]."""
    size = len(distribution)
    scaled = distribution * size
    probability = np.ones(size)
    alias = np.arange(size)
    small = [i for i in range(size) if scaled[i] < 1.0]
    large = [i for i in range(size) if scaled[i] >= 1.0]
    while small and large:
        lo, hi = small.pop(), large.pop()
        probability[lo], alias[lo] = scaled[lo], hi
        scaled[hi] += scaled[lo] - 1.0
        (small if scaled[hi] < 1.0 else large).append(hi)
    return probability, alias


ROW_BUILDERS = ("compiled", "tensor")

TOO_SMALL = ("cannot draw negatives that differ from the contexts: the vocabulary is too small; "
             "use a larger corpus, or lower data.min_count (for data.prepared: prepare again "
             "with a lower --min-count or a larger --max-vocab)")


class ExampleBuilder:
    """Holds the sampling tables on one device and turns chunks of sentences into examples.

    ``rows`` picks how windows and negatives are built: ``compiled`` (CPU only, the default
    there: data/compiled_rows.py) or ``tensor`` (whole-array operations on any device, the
    default on GPUs). Both follow d2l 14.3; they differ in their random draws.
    """

    def __init__(self, vocab: Vocab, cfg: DataConfig, device: torch.device,
                 rows: str | None = None):
        self.cfg = cfg
        self.device = device
        self.rows = rows or ("compiled" if device.type == "cpu" else "tensor")
        if self.rows not in ROW_BUILDERS or (self.rows == "compiled" and device.type != "cpu"):
            raise ValueError(f"rows must be one of {ROW_BUILDERS} ('compiled' on CPU only), "
                             f"got {self.rows!r} on {device}")
        counts = vocab.counts.astype(np.float64)
        frequency = counts / counts[1:].sum()
        keep = np.ones_like(frequency)
        keep[1:] = np.minimum(1.0, np.sqrt(cfg.subsample_t / frequency[1:]))
        self.keep_probability = torch.as_tensor(keep, device=device)
        noise = counts**0.75
        noise[0] = 0.0  # d2l draws noise from indices 1..V-1 only
        self.noise_distribution = noise / noise.sum()
        probability, alias = alias_table(self.noise_distribution)
        self.alias_probability = torch.as_tensor(probability, dtype=torch.float32, device=device)
        self.alias = torch.as_tensor(alias, dtype=torch.int32, device=device)
        self.vocab_size = len(vocab)
        self.width = 2 * cfg.max_window * (1 + cfg.num_negatives)

    def count(self, tokens: torch.Tensor, sentence_ids: torch.Tensor, g: torch.Generator) -> int:
        """How many examples :meth:`build` gives for the same inputs and generator state."""
        if self.rows == "compiled":
            from dist_w2v.data.compiled_rows import count_examples  # numba: imported when used

            return int(count_examples(tokens.numpy(), sentence_ids.numpy(),
                                      self.keep_probability.numpy(), compiled_seed(g)))
        return int(self.subsample(tokens, sentence_ids, g)[0].shape[0])

    def build(self, tokens: torch.Tensor, sentence_ids: torch.Tensor,
              g: torch.Generator) -> ChunkExamples:
        """``tokens`` (int32) and each token's sentence number, sentences whole and in order."""
        if self.rows == "compiled":
            return self.compiled_examples(tokens, sentence_ids, g)
        tokens, sentence_ids = self.subsample(tokens, sentence_ids, g)
        centers, contexts, num_contexts = self.windows(tokens, sentence_ids, g)
        return ChunkExamples(
            centers=centers,
            contexts_negatives=self.build_layout(contexts, num_contexts, g),
            num_contexts=num_contexts,
            num_negatives=self.cfg.num_negatives,
        )

    def warm_up(self) -> None:
        """Load (the first time on a machine: compile) the compiled builder with the dtypes of
        real chunks, so that its ~1 s does not land in the first training epoch."""
        if self.rows == "compiled":
            tokens = torch.tensor([1, 2, 1], dtype=torch.int32)
            sentences = torch.zeros(3, dtype=torch.int64)
            self.count(tokens, sentences, torch.Generator())
            self.build(tokens, sentences, torch.Generator())

    def compiled_examples(self, tokens: torch.Tensor, sentence_ids: torch.Tensor,
                          g: torch.Generator) -> ChunkExamples:
        from dist_w2v.data.compiled_rows import build_examples  # numba: imported when used

        centers, layout, num_contexts, drawn = build_examples(
            tokens.numpy(), sentence_ids.numpy(), self.keep_probability.numpy(),
            self.cfg.max_window, self.cfg.num_negatives, self.alias_probability.numpy(),
            self.alias.numpy(), compiled_seed(g))
        if not drawn:
            raise UserError(TOO_SMALL)
        return ChunkExamples(centers=torch.from_numpy(centers),
                             contexts_negatives=torch.from_numpy(layout),
                             num_contexts=torch.from_numpy(num_contexts),
                             num_negatives=self.cfg.num_negatives)

    def subsample(self, tokens: torch.Tensor, sentence_ids: torch.Tensor,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop frequent words at random, then sentences left with fewer than 2 words."""
        draw = torch.rand(tokens.shape, generator=g, device=self.device, dtype=torch.float64)
        kept = draw < self.keep_probability[tokens]
        tokens, sentence_ids = tokens[kept], sentence_ids[kept]
        _, inverse, lengths = torch.unique_consecutive(
            sentence_ids, return_inverse=True, return_counts=True
        )
        long_enough = lengths[inverse] >= 2
        return tokens[long_enough], sentence_ids[long_enough]

    def windows(
        self, tokens: torch.Tensor, sentence_ids: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token is a center; its contexts lie within a window drawn from 1..max_window.

        Returns the centers, their contexts packed to the left of a (N, 2·max_window) array in
        position order (as d2l lists them), and the number of contexts of each center.
        """
        m = self.cfg.max_window
        n = tokens.shape[0]
        radius = torch.randint(1, m + 1, (n,), generator=g, device=self.device)
        offsets = torch.cat(
            [torch.arange(-m, 0, device=self.device), torch.arange(1, m + 1, device=self.device)]
        )
        positions = torch.arange(n, device=self.device).unsqueeze(1) + offsets
        clamped = positions.clamp(0, max(n - 1, 0))
        valid = (
            (positions >= 0)
            & (positions < n)
            & (offsets.abs() <= radius.unsqueeze(1))
            & (sentence_ids[clamped] == sentence_ids.unsqueeze(1))
        )
        # Valid offsets form one contiguous run per row (the window minus its center), so a
        # stable sort of "invalid" flags packs them left while keeping position order.
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        contexts = torch.where(valid, tokens[clamped], 0).gather(1, order)
        return tokens, contexts, valid.sum(1)

    def draw_noise(self, count: int, g: torch.Generator) -> torch.Tensor:
        """``count`` iid draws from counts**0.75 over 1..V-1, by the alias method (exact, O(1))."""
        column = torch.randint(0, self.vocab_size, (count,), generator=g, device=self.device,
                               dtype=torch.int32)
        coin = torch.rand(count, generator=g, device=self.device)
        return torch.where(coin < self.alias_probability[column], column, self.alias[column])

    def draw_negatives(self, contexts: torch.Tensor, num_contexts: torch.Tensor,
                       g: torch.Generator) -> torch.Tensor:
        """K noise words per context, row after row, none equal to one of its row's contexts.

        Only the negatives are compared (with their own row's contexts, a window column at a
        time); a draw that hits a context is redrawn (d2l's rejection), in rounds over the
        draws that clashed. Padding holds 0, which is never drawn, so it never clashes.
        """
        per_row = num_contexts * self.cfg.num_negatives
        row = torch.repeat_interleave(torch.arange(contexts.shape[0], device=self.device),
                                      per_row)
        negatives = self.draw_noise(int(row.shape[0]), g)
        pending = None  # None: every draw (the first round)
        for _ in range(MAX_REJECTION_ROUNDS):
            rows = row if pending is None else row[pending]
            drawn = negatives if pending is None else negatives[pending]
            clash = torch.zeros_like(drawn, dtype=torch.bool)
            for j in range(contexts.shape[1]):  # a loop over window slots, not over tokens
                clash |= contexts[:, j].index_select(0, rows) == drawn
            pending = clash.nonzero().squeeze(1) if pending is None else pending[clash]
            if pending.numel() == 0:
                return negatives
            negatives[pending] = self.draw_noise(int(pending.numel()), g)
        raise UserError(TOO_SMALL)

    def build_layout(
        self, contexts: torch.Tensor, num_contexts: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """The padded (N, L) rows: n contexts, then n·K negatives, then 0."""
        k = self.cfg.num_negatives
        slots = torch.arange(self.width, device=self.device)
        n = num_contexts.unsqueeze(1)
        layout = torch.zeros((contexts.shape[0], self.width), dtype=torch.int32,
                             device=self.device)
        is_negative = (slots >= n) & (slots < n * (1 + k))
        layout.masked_scatter_(is_negative, self.draw_negatives(contexts, num_contexts, g))
        ctx_width = contexts.shape[1]
        layout[:, :ctx_width] = torch.where(slots[:ctx_width] < n, contexts, layout[:, :ctx_width])
        return layout
