"""The CPU builder of a chunk's examples: subsampling, windows and negatives in compiled loops.

On CPU the tensor version (examples.py: windows as a (N, 2·max_window) mask, negatives drawn
for every slot and redrawn in rounds over the clashes) spends about a second per PTB epoch in
temporaries and in OpenMP teams that fight the training step for the cores. Here loops compiled
by numba do per token what d2l 14.3 does: keep a word with probability min(1, sqrt(t/f)), drop
sentences left with fewer than 2 words, draw each center's window radius, copy the contexts
that lie in its sentence, then draw K noise words per context by the alias method, redrawing a
draw that equals one of the row's contexts. They run on one thread without the GIL, so the
training step goes on meanwhile.

Same semantics and distributions as the tensor version, not the same draws: the random stream
is xorshift64* seeded from the chunk's generator, so a chunk's examples are still a pure
function of (seed, epoch, chunk), and :func:`count_examples` replays the subsampling draws of
:func:`build_examples` exactly.
"""

from __future__ import annotations

import numba
import numpy as np

# A draw is redrawn while it equals one of its row's contexts; past this many tries in a row
# the vocabulary is too small to ever avoid them (PTB needs one retry in ~200 draws).
MAX_REDRAWS = 10_000


@numba.njit(cache=True, nogil=True)
def _random_state(seed: int) -> np.ndarray:
    """splitmix64 of the seed: a well-mixed, non-zero xorshift state even for small seeds."""
    z = np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.array([(z ^ (z >> np.uint64(31))) | np.uint64(1)], dtype=np.uint64)


@numba.njit(cache=True, nogil=True, inline="always")
def _uniform(state: np.ndarray) -> float:
    """xorshift64* (Vigna 2016): a uniform in [0, 1) from the top 53 bits; a few ns a draw,
    several times cheaper than numba's Mersenne Twister behind np.random."""
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return float((x * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True)
def _subsample(tokens, sentence_ids, keep_probability, state):
    """The kept tokens and their sentence numbers; sentences left with < 2 words go."""
    n = tokens.shape[0]
    kept = np.empty(n, dtype=np.bool_)
    for i in range(n):
        kept[i] = _uniform(state) < keep_probability[tokens[i]]
    out_tokens = np.empty(n, dtype=tokens.dtype)
    out_sentences = np.empty(n, dtype=np.int64)
    size = 0
    start = 0
    while start < n:
        stop = start
        while stop < n and sentence_ids[stop] == sentence_ids[start]:
            stop += 1
        words = 0
        for i in range(start, stop):
            words += kept[i]
        if words >= 2:
            for i in range(start, stop):
                if kept[i]:
                    out_tokens[size] = tokens[i]
                    out_sentences[size] = sentence_ids[i]
                    size += 1
        start = stop
    return out_tokens[:size], out_sentences[:size]


@numba.njit(cache=True, nogil=True)
def count_examples(tokens, sentence_ids, keep_probability, seed) -> int:
    """How many centers :func:`build_examples` gives for the same inputs and seed."""
    return _subsample(tokens, sentence_ids, keep_probability, _random_state(seed))[0].shape[0]


@numba.njit(cache=True, nogil=True)
def _draw_negatives(row, count, num_negatives, alias_probability, alias, state) -> bool:
    """Slots [count, count·(1+K)) of the row: noise words, none equal to a context."""
    vocab_size = alias.shape[0]
    for slot in range(count, count * (1 + num_negatives)):
        clash = True
        tries = 0
        while clash:
            if tries == MAX_REDRAWS:
                return False
            tries += 1
            # One uniform draw picks the alias column (integer part) and its coin (fraction).
            scaled = _uniform(state) * vocab_size
            word = int(scaled)
            if scaled - word >= alias_probability[word]:
                word = alias[word]
            clash = False
            for c in range(count):
                if row[c] == word:
                    clash = True
                    break
        row[slot] = word
    return True


@numba.njit(cache=True, nogil=True)
def build_examples(tokens, sentence_ids, keep_probability, max_window, num_negatives,
                   alias_probability, alias, seed):
    """(centers, padded (N, 2·max_window·(1+K)) rows, context counts, drawn) of a chunk;
    drawn is False when the vocabulary is too small to avoid a row's contexts."""
    state = _random_state(seed)
    centers, sentences = _subsample(tokens, sentence_ids, keep_probability, state)
    n = centers.shape[0]
    layout = np.zeros((n, 2 * max_window * (1 + num_negatives)), dtype=np.int32)
    num_contexts = np.zeros(n, dtype=np.int64)
    start = 0
    end = 0
    for i in range(n):
        if i == end:  # the first token of a sentence: find where it ends
            start = i
            end = i + 1
            while end < n and sentences[end] == sentences[i]:
                end += 1
        radius = 1 + int(_uniform(state) * max_window)
        row = layout[i]
        count = 0
        for j in range(max(start, i - radius), min(end, i + radius + 1)):
            if j != i:
                row[count] = centers[j]
                count += 1
        num_contexts[i] = count
        if not _draw_negatives(row, count, num_negatives, alias_probability, alias, state):
            return centers, layout, num_contexts, False
    return centers, layout, num_contexts, True
