"""Judging embeddings: nearest neighbours by cosine, word-similarity and analogy benchmarks.

Neighbours follow the seed's ``get_similar_tokens``. The benchmarks are the files gensim ships
(WordSim353, SimLex-999, Google analogies), scored over the items whose words are all in the
vocabulary, with that coverage reported next to every score. Benchmark words are lower-cased
(PTB is lower-case). Everything is numpy over row blocks of the table (:class:`UnitTable`): a PTB
model is one block and is judged in milliseconds; a 1M-word table is scanned in blocks of at most
``CHUNK_BYTES``, never copied whole, so it may stay memory-mapped.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError
from dist_w2v.outputs.strict_json import json_safe  # noqa: F401 - the --json schema's helper

WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
ANALOGIES = "questions-words.txt"
GENSIM_MISSING = (
    "the benchmark files come with gensim, which is not installed; "
    "install it: pip install gensim (from a checkout: pip install -e '.[eval]')"
)
# The most bytes one block of normalised rows (float64 while dividing) or of float32 scores may
# take: a 1M x 300 table is read 27,962 rows at a time, whatever its size.
CHUNK_BYTES = 64 * 2**20


def row_norms(matrix: np.ndarray) -> np.ndarray:
    """(n,) float64 norms of the rows (plus a tiny epsilon: a zero row stays finite)."""
    return np.sqrt((matrix.astype(np.float64) ** 2).sum(axis=1) + 1e-9)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """The whole table with unit rows, float32; for small tables and tests (UnitTable for any)."""
    return (matrix / row_norms(matrix)[:, None]).astype(np.float32)


class UnitTable:
    """The rows of a (V, D) table scaled to unit length, without a normalised copy of the table.

    The norms are computed once (one (V,) float64 vector); unit rows are made on demand, for a few
    ids or one block of ``block_rows`` rows at a time, each bit for bit the row
    :func:`normalize_rows` gives. ``vectors`` may be a read-only memory map.
    """

    def __init__(self, vectors: np.ndarray, chunk_bytes: int = CHUNK_BYTES):
        self.vectors = vectors
        self.chunk_bytes = chunk_bytes
        self.block_rows = max(1, chunk_bytes // (8 * max(1, vectors.shape[1])))
        self.norms = np.empty(len(vectors), dtype=np.float64)
        for start in range(0, len(vectors), self.block_rows):
            block = vectors[start : start + self.block_rows]
            self.norms[start : start + len(block)] = row_norms(block)

    def __len__(self) -> int:
        return len(self.vectors)

    def rows(self, ids: np.ndarray | slice) -> np.ndarray:
        """(n, D) float32 unit rows: the given ids, or a slice of the table."""
        if not isinstance(ids, slice):
            ids = np.asarray(ids, dtype=np.int64)
        return (self.vectors[ids] / self.norms[ids, None]).astype(np.float32)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, unit rows) for consecutive blocks covering the table."""
        for start in range(0, len(self), self.block_rows):
            yield start, self.rows(slice(start, start + self.block_rows))

    def cosine_blocks(self, queries: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(first query, first row, scores): ``queries @ unit.T`` in pieces of at most
        ``chunk_bytes`` float32 scores, over every block of rows and slice of queries."""
        for start, block in self.blocks():
            per_chunk = max(1, self.chunk_bytes // (4 * len(block)))
            for first in range(0, len(queries), per_chunk):
                yield first, start, queries[first : first + per_chunk] @ block.T


def top_k_cosine(table: UnitTable, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(ids), k) indices and cosines of each given row's nearest rows, best first (equal
    cosines by index), from one pass over the table; the row itself and <unk> (row 0) are never
    neighbours. ``k`` is capped at V - 2, the number of candidates."""
    ids = np.asarray(ids, dtype=np.int64)
    k = max(0, min(k, len(table) - 2))
    best_ids = np.full((len(ids), k), -1, dtype=np.int64)
    best = np.full((len(ids), k), -np.inf, dtype=np.float32)
    if k == 0 or len(ids) == 0:
        return best_ids, best
    for first, start, scores in table.cosine_blocks(table.rows(ids)):
        here = slice(first, first + len(scores))
        own = ids[here] - start
        inside = (own >= 0) & (own < scores.shape[1])
        scores[np.flatnonzero(inside), own[inside]] = -np.inf
        if start == 0:
            scores[:, 0] = -np.inf
        keep = min(k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        merged_ids = np.concatenate([best_ids[here], part + start], axis=1)
        merged = np.concatenate([best[here], np.take_along_axis(scores, part, axis=1)], axis=1)
        order = np.lexsort((merged_ids, -merged), axis=-1)[:, :k]
        best_ids[here] = np.take_along_axis(merged_ids, order, axis=1)
        best[here] = np.take_along_axis(merged, order, axis=1)
    return best_ids, best


def probe_neighbours(table: UnitTable, vocab: Vocab, probes: list[str],
                     k: int) -> dict[str, list[tuple[str, float]]]:
    """Top-k cosine neighbours of each probe word in the vocabulary (the others are skipped),
    the word itself and <unk> excluded; one pass over the table for all of them."""
    known = [w for w in dict.fromkeys(probes) if vocab[w] != 0]
    top, cosines = top_k_cosine(table, np.array([vocab[w] for w in known], dtype=np.int64), k)
    return {
        word: [(vocab.idx_to_token[i], float(c)) for i, c in zip(row, cos, strict=True)]
        for word, row, cos in zip(known, top.tolist(), cosines.tolist(), strict=True)
    }


def nearest(table: UnitTable, vocab: Vocab, word: str, k: int) -> list[tuple[str, float]]:
    """Top-k cosine neighbours of a known word (a UserError for an unknown one)."""
    vocab.index(word)
    return probe_neighbours(table, vocab, [word], k)[word]


# -- rank correlation ------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (as scipy's rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)
    last = np.r_[first[1:], len(values)] - 1
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the average ranks (NaN below 2 distinct ranks)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx = average_ranks(x) - (len(x) + 1) / 2.0
    ry = average_ranks(y) - (len(y) + 1) / 2.0
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


# -- benchmark files -------------------------------------------------------------------------


@dataclass
class WordPairs:
    """A word-similarity benchmark: pairs of words and the human similarity score of each."""

    name: str
    pairs: list[tuple[str, str]]
    scores: np.ndarray


@dataclass
class Analogies:
    """Analogy questions a:b :: c:d, one row (a, b, c, d) each."""

    name: str
    questions: list[tuple[str, str, str, str]]


@dataclass
class Benchmarks:
    similarity: list[WordPairs]
    analogies: Analogies


def read_word_pairs(path: Path, name: str) -> WordPairs:
    """Tab-separated ``word1 word2 score`` lines; ``#`` lines are comments."""
    pairs, scores = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        first, second, score = line.split("\t")[:3]
        pairs.append((first.lower(), second.lower()))
        scores.append(float(score))
    return WordPairs(name, pairs, np.asarray(scores, dtype=np.float64))


def read_analogies(path: Path, name: str = "analogy") -> Analogies:
    """The Google analogy file: ``: section`` headers, then ``a b c d`` per line."""
    questions = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith(":"):
            continue
        a, b, c, d = line.lower().split()
        questions.append((a, b, c, d))
    return Analogies(name, questions)


def gensim_data_dir() -> Path:
    """The folder ``gensim.test.utils.datapath`` reads from; a UserError without gensim.

    Found through the import system without importing gensim, which would cost about a second
    of scipy imports per evaluation for three text files.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(GENSIM_MISSING)
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not (data_dir / WORDSIM353).is_file():
        raise UserError(f"gensim at {data_dir.parent.parent} lacks its test data; {GENSIM_MISSING}")
    return data_dir


def load_benchmarks(data_dir: Path | None = None) -> Benchmarks:
    data_dir = gensim_data_dir() if data_dir is None else Path(data_dir)
    return Benchmarks(
        similarity=[
            read_word_pairs(data_dir / WORDSIM353, "wordsim353"),
            read_word_pairs(data_dir / SIMLEX999, "simlex999"),
        ],
        analogies=read_analogies(data_dir / ANALOGIES),
    )


def benchmarks_if_available() -> Benchmarks | None:
    """The benchmarks when gensim is importable, else None (training then logs neighbours only)."""
    try:
        return load_benchmarks()
    except UserError:
        return None


# -- scoring ---------------------------------------------------------------------------------


def lookup(vocab: Vocab, rows: list[tuple[str, ...]]) -> np.ndarray:
    """(n, width) vocabulary indices; 0 marks a word the vocabulary does not have."""
    width = len(rows[0]) if rows else 0
    flat = [vocab[word] for row in rows for word in row]
    return np.asarray(flat, dtype=np.int64).reshape(len(rows), width)


def score_similarity(table: UnitTable, vocab: Vocab, bench: WordPairs) -> dict[str, Any]:
    """Spearman between cosines and human scores over the pairs with both words known."""
    ids = lookup(vocab, bench.pairs)
    known = (ids != 0).all(axis=1)
    first, second = ids[known, 0], ids[known, 1]
    cosines = (table.rows(first) * table.rows(second)).sum(axis=1)
    used, total = int(known.sum()), len(bench.pairs)
    return {
        "spearman": spearman(cosines, bench.scores[known]),
        "pairs": used,
        "total": total,
        "coverage": used / total if total else 0.0,
    }


def answer_analogies(table: UnitTable, ids: np.ndarray) -> np.ndarray:
    """3CosAdd: argmax over words of cos(w, b - a + c), a, b, c and <unk> never answers.

    A running argmax over blocks of questions x rows; a later block takes over only with a
    strictly higher score, so ties go to the lower index as one whole-matrix argmax would.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, 4)
    queries = table.rows(ids[:, 1]) - table.rows(ids[:, 0]) + table.rows(ids[:, 2])
    answers = np.zeros(len(ids), dtype=np.int64)
    best = np.full(len(ids), -np.inf, dtype=np.float32)
    for first, start, scores in table.cosine_blocks(queries):
        here = slice(first, first + len(scores))
        for column in range(3):
            own = ids[here, column] - start
            inside = (own >= 0) & (own < scores.shape[1])
            scores[np.flatnonzero(inside), own[inside]] = -np.inf
        if start == 0:
            scores[:, 0] = -np.inf
        top = scores.argmax(axis=1)
        top_scores = scores[np.arange(len(scores)), top]
        better = top_scores > best[here]
        answers[here][better] = top[better] + start
        best[here][better] = top_scores[better]
    return answers


def score_analogies(table: UnitTable, vocab: Vocab, bench: Analogies) -> dict[str, Any]:
    """3CosAdd accuracy over the questions whose four words are all known."""
    ids = lookup(vocab, bench.questions)
    known = (ids != 0).all(axis=1) if len(ids) else np.zeros(0, dtype=bool)
    covered = ids[known]
    correct = int((answer_analogies(table, covered) == covered[:, 3]).sum()) if len(covered) else 0
    used, total = int(known.sum()), len(bench.questions)
    return {
        "accuracy": correct / used if used else float("nan"),
        "correct": correct,
        "questions": used,
        "total": total,
        "coverage": used / total if total else 0.0,
    }


def score_benchmarks(table: UnitTable, vocab: Vocab, benchmarks: Benchmarks) -> dict[str, Any]:
    """Every benchmark's score and coverage, keyed by benchmark name."""
    results: dict[str, Any] = {
        bench.name: score_similarity(table, vocab, bench) for bench in benchmarks.similarity
    }
    results[benchmarks.analogies.name] = score_analogies(table, vocab, benchmarks.analogies)
    return results


def headline(results: dict[str, Any]) -> str:
    """One line for humans: each benchmark's score with its coverage."""
    parts = []
    for name, r in results.items():
        if "spearman" in r:
            parts.append(f"{name} {r['spearman']:.3f} ({r['pairs']}/{r['total']} pairs)")
        elif "accuracy" in r:
            parts.append(f"{name} {r['accuracy']:.1%} ({r['questions']}/{r['total']} questions)")
    return ", ".join(parts)


class TrainingEvaluator:
    """Epoch-end evaluation during training: probe neighbours, and the benchmarks when gensim
    is importable. The benchmark files are read at the first call, so only the evaluating rank
    ever reads them."""

    def __init__(self, vocab: Vocab, probes: list[str], k: int, say: Any = print):
        self.vocab = vocab
        self.probes = probes
        self.k = k
        self.say = say
        self._benchmarks: Benchmarks | None = None
        self._looked_for_benchmarks = False
        self._named_missing_probes = False

    def name_missing_probes(self) -> None:
        """Once per run: the probe words the vocabulary lacks (they are skipped, not shown)."""
        if self._named_missing_probes:
            return
        self._named_missing_probes = True
        missing = [w for w in self.probes if self.vocab[w] == 0]
        if missing:
            self.say(f"eval: probe words not in the vocabulary, skipped: {', '.join(missing)} "
                     "(set eval.probes to words of this corpus)")

    def benchmarks(self) -> Benchmarks | None:
        if not self._looked_for_benchmarks:
            self._looked_for_benchmarks = True
            self._benchmarks = benchmarks_if_available()
            if self._benchmarks is None:
                self.say("eval: gensim is not installed, so only neighbours are logged; "
                         "pip install gensim (or pip install -e '.[eval]' in a checkout) adds "
                         "WordSim353, SimLex-999 and analogies")
        return self._benchmarks

    def __call__(self, model: Any, epoch: int, global_step: int) -> dict[str, Any]:
        """``model``: anything with a ``center`` embedding table (the unwrapped SkipGram)."""
        started = time.perf_counter()
        self.name_missing_probes()
        vectors = model.center.weight.detach().cpu().numpy()
        record = judge(vectors, self.vocab, self.benchmarks(), self.probes, self.k)
        record["seconds"] = time.perf_counter() - started
        return record


def judge(vectors: np.ndarray, vocab: Vocab, benchmarks: Benchmarks | None, probes: list[str],
          k: int) -> dict[str, Any]:
    """Probe neighbours, and the benchmark scores when there are benchmarks, from one
    computation of the row norms."""
    table = UnitTable(vectors)
    record: dict[str, Any] = {}
    if benchmarks is not None:
        record["benchmarks"] = score_benchmarks(table, vocab, benchmarks)
    record["neighbours"] = probe_neighbours(table, vocab, probes, k)
    return record


def evaluation_report(vectors: np.ndarray, vocab: Vocab, benchmarks: Benchmarks,
                      probes: list[str], k: int) -> dict[str, Any]:
    """What ``dist-w2v eval`` reports (its --json schema): sizes, benchmarks, probe neighbours."""
    started = time.perf_counter()
    report: dict[str, Any] = {
        "vocab_size": len(vocab),
        "dim": int(vectors.shape[1]),
        **judge(vectors, vocab, benchmarks, probes, k),
    }
    report["seconds"] = time.perf_counter() - started
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`evaluation_report`."""
    lines = [f"{report['vocab_size']} words, {report['dim']} dimensions"]
    for name, r in report["benchmarks"].items():
        if "spearman" in r:
            lines.append(f"{name:<12} Spearman {r['spearman']:6.3f}   pairs {r['pairs']}/"
                         f"{r['total']} ({r['coverage']:.1%} in vocabulary)")
        else:
            lines.append(f"{name:<12} accuracy {r['accuracy']:6.1%}   questions {r['questions']}/"
                         f"{r['total']} ({r['coverage']:.1%} in vocabulary), 3CosAdd")
    for word, found in report["neighbours"].items():
        lines.append(f"{word} -> {format_neighbours(found)}")
    return "\n".join(lines)


def format_neighbours(found: list[tuple[str, float]]) -> str:
    return ", ".join(f"{w} {s:.3f}" for w, s in found)
