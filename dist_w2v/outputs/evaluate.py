"""Judging embeddings: nearest neighbours by cosine, word-similarity and analogy benchmarks.

Neighbours follow the seed's ``get_similar_tokens``. The benchmarks are the files gensim ships
(WordSim353, SimLex-999, Google analogies), scored over the items whose words are all in the
vocabulary, with that coverage reported next to every score. Benchmark words are lower-cased
(PTB is lower-case). Everything is whole-matrix numpy: a PTB model is judged in milliseconds.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_w2v.data.corpus import Vocab
from dist_w2v.errors import UserError
from dist_w2v.outputs.strict_json import json_safe  # noqa: F401 - the --json schema's helper

WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
ANALOGIES = "questions-words.txt"
GENSIM_MISSING = (
    "the benchmark files come with gensim, which is not installed; "
    "install it: pip install gensim (from a checkout: pip install -e '.[eval]')"
)
# Analogy questions scored per matrix product: (chunk, V) float32 stays a few MB.
ANALOGY_CHUNK = 256


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
    vectors: np.ndarray, vocab: Vocab, probes: list[str], k: int, unit: np.ndarray | None = None
) -> dict[str, list[tuple[str, float]]]:
    """Neighbours of each probe word in the vocabulary (probes not in it are skipped)."""
    unit = normalize_rows(vectors) if unit is None else unit
    return {w: nearest(vectors, vocab, w, k, unit) for w in probes if vocab[w] != 0}


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


def score_similarity(unit: np.ndarray, vocab: Vocab, bench: WordPairs) -> dict[str, Any]:
    """Spearman between cosines and human scores over the pairs with both words known."""
    ids = lookup(vocab, bench.pairs)
    known = (ids != 0).all(axis=1)
    first, second = ids[known, 0], ids[known, 1]
    cosines = (unit[first] * unit[second]).sum(axis=1)
    used, total = int(known.sum()), len(bench.pairs)
    return {
        "spearman": spearman(cosines, bench.scores[known]),
        "pairs": used,
        "total": total,
        "coverage": used / total if total else 0.0,
    }


def answer_analogies(unit: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """3CosAdd: argmax over words of cos(w, b - a + c), a, b, c and <unk> never answers."""
    answers = np.empty(len(ids), dtype=np.int64)
    rows = np.arange(min(ANALOGY_CHUNK, len(ids)))
    for start in range(0, len(ids), ANALOGY_CHUNK):
        chunk = ids[start : start + ANALOGY_CHUNK]
        a, b, c = chunk[:, 0], chunk[:, 1], chunk[:, 2]
        scores = (unit[b] - unit[a] + unit[c]) @ unit.T
        here = rows[: len(chunk)]
        scores[here, a] = -np.inf
        scores[here, b] = -np.inf
        scores[here, c] = -np.inf
        scores[:, 0] = -np.inf
        answers[start : start + len(chunk)] = scores.argmax(axis=1)
    return answers


def score_analogies(unit: np.ndarray, vocab: Vocab, bench: Analogies) -> dict[str, Any]:
    """3CosAdd accuracy over the questions whose four words are all known."""
    ids = lookup(vocab, bench.questions)
    known = (ids != 0).all(axis=1) if len(ids) else np.zeros(0, dtype=bool)
    covered = ids[known]
    correct = int((answer_analogies(unit, covered) == covered[:, 3]).sum()) if len(covered) else 0
    used, total = int(known.sum()), len(bench.questions)
    return {
        "accuracy": correct / used if used else float("nan"),
        "correct": correct,
        "questions": used,
        "total": total,
        "coverage": used / total if total else 0.0,
    }


def score_benchmarks(vectors: np.ndarray, vocab: Vocab, benchmarks: Benchmarks,
                     unit: np.ndarray | None = None) -> dict[str, Any]:
    """Every benchmark's score and coverage, keyed by benchmark name."""
    unit = normalize_rows(vectors) if unit is None else unit
    results: dict[str, Any] = {
        bench.name: score_similarity(unit, vocab, bench) for bench in benchmarks.similarity
    }
    results[benchmarks.analogies.name] = score_analogies(unit, vocab, benchmarks.analogies)
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
    normalisation of the table."""
    unit = normalize_rows(vectors)
    record: dict[str, Any] = {}
    if benchmarks is not None:
        record["benchmarks"] = score_benchmarks(vectors, vocab, benchmarks, unit)
    record["neighbours"] = probe_neighbours(vectors, vocab, probes, k, unit)
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
