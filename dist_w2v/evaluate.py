"""Judging embeddings: nearest neighbours by cosine, as the seed's ``get_similar_tokens``."""

from __future__ import annotations

import numpy as np

from dist_w2v.corpus import Vocab


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.sqrt((matrix.astype(np.float64) ** 2).sum(axis=1, keepdims=True) + 1e-9)
    return (matrix / norms).astype(np.float32)


def nearest(
    vectors: np.ndarray, vocab: Vocab, word: str, k: int, unit: np.ndarray | None = None
) -> list[tuple[str, float]]:
    """Top-k cosine neighbours of a known word, the word itself (and <unk>) excluded."""
    idx = vocab.index(word)
    unit = normalize_rows(vectors) if unit is None else unit
    cos = unit @ unit[idx]
    cos[idx] = -np.inf
    cos[0] = -np.inf
    k = min(k, len(vocab) - 2)
    top = np.argpartition(-cos, k)[:k] if k < len(cos) else np.arange(len(cos))
    top = top[np.argsort(-cos[top], kind="stable")]
    return [(vocab.idx_to_token[i], float(cos[i])) for i in top]


def probe_neighbours(
    vectors: np.ndarray, vocab: Vocab, probes: list[str], k: int
) -> dict[str, list[tuple[str, float]]]:
    """Neighbours of each probe word in the vocabulary (probes not in it are skipped)."""
    unit = normalize_rows(vectors)
    return {w: nearest(vectors, vocab, w, k, unit) for w in probes if vocab[w] != 0}
