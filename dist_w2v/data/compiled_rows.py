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
is splitmix64 over a counter that starts at a seed from the chunk's generator, so a chunk's
examples are still a pure function of (seed, epoch, chunk), and :func:`count_examples` replays
the subsampling draws of :func:`build_examples` exactly. A counter-based stream has no chain
from one draw to the next, so the CPU overlaps consecutive draws: the negatives, most of the
build, took 7 ms of a PTB chunk's 8 with xorshift64* (a 20-cycle dependency per draw).
"""

from __future__ import annotations

import numba
import numpy as np

# A draw is redrawn while it equals one of its row's contexts; past this many tries in a row
# the vocabulary is too small to ever avoid them (PTB needs one retry in ~200 draws).
MAX_REDRAWS = 10_000


GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True, inline="always")
def _random_bits(counter: np.uint64) -> tuple[np.uint64, np.uint64]:
    """splitmix64 (Steele, Lea & Flood 2014): the next counter and 64 well-mixed bits."""
    counter += GOLDEN_GAMMA
    z = counter
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return counter, z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def _uniform(counter: np.uint64) -> tuple[np.uint64, float]:
    """The next counter and a uniform in [0, 1) from the top 53 bits."""
    counter, bits = _random_bits(counter)
    return counter, float(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _noise_word(bits: np.uint64, alias_probability: np.ndarray, alias: np.ndarray) -> int:
    """One alias-method draw from 64 random bits: the top 32 pick the column (multiply-shift,
    no division), 21 lower ones toss its coin. Branch-free (both outcomes loaded, one kept
    by arithmetic): the coin is a coin flip for the branch predictor too."""
    column = np.int64(((bits >> np.uint64(32)) * np.uint64(alias.shape[0])) >> np.uint64(32))
    coin = np.float32((bits >> np.uint64(11)) & np.uint64(0x1FFFFF)) * np.float32(2.0**-21)
    other = np.int64(alias[column])
    keep = np.int64(coin < alias_probability[column])
    return other + keep * (column - other)


@numba.njit(cache=True, nogil=True)
def _subsample(tokens, sentence_ids, keep_probability, counter):
    """The kept tokens and their sentence numbers (sentences left with < 2 words go), and the
    random counter after the draws."""
    n = tokens.shape[0]
    kept = np.empty(n, dtype=np.bool_)
    for i in range(n):
        counter, draw = _uniform(counter)
        kept[i] = draw < keep_probability[tokens[i]]
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
    return out_tokens[:size], out_sentences[:size], counter


@numba.njit(cache=True, nogil=True)
def count_examples(tokens, sentence_ids, keep_probability, seed) -> int:
    """How many centers :func:`build_examples` gives for the same inputs and seed."""
    return _subsample(tokens, sentence_ids, keep_probability, np.uint64(seed))[0].shape[0]


@numba.njit(cache=True, nogil=True)
def _draw_negatives(row, count, num_negatives, alias_probability, alias, counter):
    """Slots [count, count·(1+K)) of the row: noise words, none equal to a context. Returns
    the counter, and False when a slot found no such word in MAX_REDRAWS tries."""
    for slot in range(count, count * (1 + num_negatives)):
        clash = True
        tries = 0
        while clash:
            if tries == MAX_REDRAWS:
                return counter, False
            tries += 1
            counter, bits = _random_bits(counter)
            word = _noise_word(bits, alias_probability, alias)
            clash = False
            for c in range(count):  # no early exit: a clash is rare, a branch per context not
                clash |= row[c] == word
        row[slot] = word
    return counter, True


@numba.njit(cache=True, nogil=True)
def build_examples(tokens, sentence_ids, keep_probability, max_window, num_negatives,
                   alias_probability, alias, seed):
    """(centers, padded (N, 2·max_window·(1+K)) rows, context counts, drawn) of a chunk;
    drawn is False when the vocabulary is too small to avoid a row's contexts."""
    centers, sentences, counter = _subsample(tokens, sentence_ids, keep_probability,
                                             np.uint64(seed))
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
        counter, draw = _uniform(counter)
        radius = 1 + int(draw * max_window)
        row = layout[i]
        count = 0
        for j in range(max(start, i - radius), min(end, i + radius + 1)):
            if j != i:
                row[count] = centers[j]
                count += 1
        num_contexts[i] = count
        counter, drawn = _draw_negatives(row, count, num_negatives, alias_probability, alias,
                                         counter)
        if not drawn:
            return centers, layout, num_contexts, False
    return centers, layout, num_contexts, True
