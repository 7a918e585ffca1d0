"""Benchmarks and evaluation: rank correlation, analogies, gensim's files, `dist-w2v eval`,
and the evaluation inside a 2-process torchrun run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE
from workers import run, train_command

from dist_w2v.cli import main
from dist_w2v.data.vocab import UNK, Vocab
from dist_w2v.errors import UserError
from dist_w2v.outputs.artifacts import Embeddings, save_outputs
from dist_w2v.outputs.evaluate import (
    CHUNK_BYTES,
    Analogies,
    UnitTable,
    answer_analogies,
    average_ranks,
    load_benchmarks,
    lookup,
    nearest,
    normalize_rows,
    probe_neighbours,
    read_analogies,
    read_word_pairs,
    score_analogies,
    score_benchmarks,
    score_similarity,
    spearman,
)


def vocab_of(words: list[str]) -> Vocab:
    return Vocab([UNK, *words], np.arange(len(words) + 1, 0, -1))


# -- rank correlation ------------------------------------------------------------------------


def test_average_ranks_share_ties():
    assert average_ranks(np.array([10, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]


def test_spearman_hand_computed():
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # Ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): centred products 4.5 over sqrt(4.5 * 5).
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(
        4.5 / np.sqrt(22.5))
    assert np.isnan(spearman(np.array([1.0]), np.array([2.0])))
    assert np.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))


def test_spearman_equals_scipy_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 200), rng.integers(0, 9, 200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


# -- word pairs and analogies on hand-made vectors ------------------------------------------


def test_similarity_over_known_pairs_with_coverage(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# Word 1\tWord 2\tHuman\nCat\tDog\t9\ncat\tcar\t1\ndog\tcar\t4\n"
                    "cat\tunicorn\t5\n")
    bench = read_word_pairs(path, "toy")
    assert bench.pairs[0] == ("cat", "dog")  # lower-cased
    angle = np.radians
    vectors = np.array([[0, 0]] + [[np.cos(angle(a)), np.sin(angle(a))] for a in (0, 10, 80)])
    vocab = vocab_of(["cat", "dog", "car"])
    # cos(cat, dog) > cos(dog, car) > cos(cat, car): the same order as the human scores.
    result = score_similarity(UnitTable(vectors), vocab, bench)
    assert result == {"spearman": pytest.approx(1.0), "pairs": 3, "total": 4, "coverage": 0.75}


def analogy_world() -> tuple[np.ndarray, Vocab]:
    """4-d vectors where man:king :: woman:queen, the nearest word to king - man + woman is a
    question word (woman), and <unk> points exactly along that sum."""
    words = ["man", "woman", "king", "queen", "apple"]
    rows = [[0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0.2, 0], [0, 0, 0, 1]]
    unit = normalize_rows(np.array(rows, dtype=np.float32))
    target = unit[2] - unit[0] + unit[1]
    return np.vstack([target, unit]), vocab_of(words)


def test_analogy_3cosadd_excludes_question_words_and_unk():
    vectors, vocab = analogy_world()
    unit = normalize_rows(vectors)
    man, woman, king, queen = (vocab[w] for w in ("man", "woman", "king", "queen"))
    raw = unit @ (unit[king] - unit[man] + unit[woman])
    assert raw.argmax() == 0 and np.argsort(-raw)[1] == woman  # what the exclusions must skip
    answers = answer_analogies(UnitTable(vectors), np.array([[man, king, woman, queen]]))
    assert answers.tolist() == [queen]


def test_analogy_accuracy_and_coverage():
    vectors, vocab = analogy_world()
    questions = Analogies("toy", [
        ("man", "king", "woman", "queen"),  # right
        ("man", "woman", "king", "apple"),  # answered queen: wrong
        ("man", "king", "girl", "queen"),  # girl not in the vocabulary: not asked
    ])
    result = score_analogies(UnitTable(vectors), vocab, questions)
    assert result == {"accuracy": 0.5, "correct": 1, "questions": 2, "total": 3,
                      "coverage": pytest.approx(2 / 3)}


def test_analogy_file_format(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(": capital-common-countries\nAthens Greece Baghdad Iraq\n: family\n"
                    "boy girl brother sister\n")
    assert read_analogies(path).questions == [("athens", "greece", "baghdad", "iraq"),
                                              ("boy", "girl", "brother", "sister")]


# -- the block-by-block scans against whole-matrix references ---------------------------------


def whole_matrix_analogies(unit: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """3CosAdd as one (Q, V) score matrix: the reference the blocked scan must reproduce."""
    scores = (unit[ids[:, 1]] - unit[ids[:, 0]] + unit[ids[:, 2]]) @ unit.T
    rows = np.arange(len(ids))
    for column in range(3):
        scores[rows, ids[:, column]] = -np.inf
    scores[:, 0] = -np.inf
    return scores.argmax(axis=1)


def random_table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def test_unit_rows_equal_the_normalised_table_in_every_block():
    vectors = random_table(50, 6)
    table = UnitTable(vectors, chunk_bytes=8 * 6 * 7)  # 7 rows a block: 8 blocks, one short
    assert table.block_rows == 7
    starts, blocks = zip(*table.blocks(), strict=True)
    assert starts == tuple(range(0, 50, 7))
    np.testing.assert_array_equal(np.vstack(blocks), normalize_rows(vectors))
    np.testing.assert_array_equal(table.rows([3, 49, 3]), normalize_rows(vectors)[[3, 49, 3]])


@pytest.mark.parametrize("block_rows", [7, 500, None])  # None: the default, one block
def test_blocked_neighbours_equal_whole_matrix(block_rows):
    vectors = random_table(1000, 16, seed=3)
    chunk = CHUNK_BYTES if block_rows is None else 8 * 16 * block_rows
    table = UnitTable(vectors, chunk_bytes=chunk)
    vocab = vocab_of([f"w{i}" for i in range(1, 1000)])
    probes = ["w1", "w500", "w999", "w7", "nope", "w1"]
    found = probe_neighbours(table, vocab, probes, 12)
    assert list(found) == ["w1", "w500", "w999", "w7"]
    unit = normalize_rows(vectors)
    for word, neighbours in found.items():
        cos = unit @ unit[vocab[word]]
        cos[[0, vocab[word]]] = -np.inf
        top = np.argsort(-cos, kind="stable")[:12]
        assert [w for w, _ in neighbours] == [vocab.idx_to_token[i] for i in top]
        np.testing.assert_allclose([c for _, c in neighbours], cos[top], atol=1e-6)
    alone = nearest(table, vocab, "w7", 12)  # a (1, D) product: equal up to float rounding
    assert [w for w, _ in alone] == [w for w, _ in found["w7"]]
    assert len(nearest(table, vocab, "w7", 5000)) == 998  # k capped at V - 2
    with pytest.raises(UserError, match="unknown word 'nope'"):
        nearest(table, vocab, "nope", 3)


def test_blocked_analogies_equal_whole_matrix_on_ptb(ptb_vocab):
    pytest.importorskip("gensim")
    analogies = load_benchmarks().analogies
    ids = lookup(ptb_vocab, analogies.questions)
    ids = ids[(ids != 0).all(axis=1)]
    vectors = random_table(len(ptb_vocab), 20, seed=4)
    expected = whole_matrix_analogies(normalize_rows(vectors), ids)
    # 500-row blocks and 40-question slices, then the default (one block, 2,496 questions).
    for chunk in (8 * 20 * 500, CHUNK_BYTES):
        table = UnitTable(vectors, chunk_bytes=chunk)
        np.testing.assert_array_equal(answer_analogies(table, ids), expected)
        result = score_analogies(table, ptb_vocab, analogies)
        assert (result["correct"], result["questions"]) == (int((expected == ids[:, 3]).sum()),
                                                            3013)


def test_blocked_analogies_equal_brute_force_on_200k_words():
    vectors = random_table(200_000, 50, seed=5)
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 200_000, size=(6, 4))
    ids[0, :3] = [199_999, 1, 100_000]  # question words at both ends and across a block edge
    table = UnitTable(vectors)  # default chunk: 167,772-row blocks, so two of them
    assert table.block_rows < 200_000
    unit = normalize_rows(vectors)
    expected = whole_matrix_analogies(unit, ids)
    np.testing.assert_array_equal(answer_analogies(table, ids), expected)


# -- gensim's benchmark files on the PTB vocabulary -----------------------------------------


@pytest.fixture(scope="module")
def ptb_vocab(prepared_ptb) -> Vocab:
    return prepared_ptb.vocab


def test_gensim_benchmarks_on_ptb_vocabulary(ptb_vocab):
    pytest.importorskip("gensim")
    benchmarks = load_benchmarks()
    vectors = np.random.default_rng(0).standard_normal((len(ptb_vocab), 100)).astype(np.float32)
    started = time.perf_counter()
    results = score_benchmarks(UnitTable(vectors), ptb_vocab, benchmarks)
    seconds = time.perf_counter() - started
    # Coverage as DESIGN.md measured it with the d2l reimplementation.
    assert (results["wordsim353"]["pairs"], results["wordsim353"]["total"]) == (217, 353)
    assert (results["simlex999"]["pairs"], results["simlex999"]["total"]) == (421, 999)
    assert results["analogy"]["total"] == 19544 and results["analogy"]["questions"] == 3013
    # Random vectors score near zero; the point is the time (about 0.1 s when the CPU is idle).
    assert abs(results["wordsim353"]["spearman"]) < 0.2
    assert seconds < 3.0, f"whole PTB evaluation took {seconds:.2f} s: is it still vectorized?"


# -- the `eval` command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, ptb_vocab) -> Path:
    """A run directory holding PTB-vocabulary vectors, written by the real output writer."""
    run_dir = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(1)
    center = rng.standard_normal((len(ptb_vocab), 20)).astype(np.float32)
    save_outputs(run_dir, Embeddings(center, center.copy(), ptb_vocab))
    return run_dir


def test_eval_json_schema(vector_run, capsys):
    pytest.importorskip("gensim")
    assert main(["eval", "--run-dir", str(vector_run), "--json", "--probes", "chip,zzzz",
                 "-k", "2"]) == 2  # zzzz is unknown: the report is still given, then exit 2
    out, err = capsys.readouterr()
    assert err == "dist-w2v: error: unknown word 'zzzz': not in the vocabulary (6719 words)\n"
    report = json.loads(out)
    assert set(report) == {"source", "vocab_size", "dim", "benchmarks", "neighbours", "seconds"}
    assert (report["vocab_size"], report["dim"]) == (6719, 20)
    bench = report["benchmarks"]
    for name in ("wordsim353", "simlex999"):
        assert set(bench[name]) == {"spearman", "pairs", "total", "coverage"}
    assert set(bench["analogy"]) == {"accuracy", "correct", "questions", "total", "coverage"}
    assert bench["wordsim353"]["coverage"] == pytest.approx(217 / 353)
    assert list(report["neighbours"]) == ["chip"]  # zzzz is not in the vocabulary
    assert [len(pair) for pair in report["neighbours"]["chip"]] == [2, 2]


def test_eval_text_output(vector_run, capsys):
    pytest.importorskip("gensim")
    assert main(["eval", "--run-dir", str(vector_run)]) == 0
    out = capsys.readouterr().out
    assert "wordsim353" in out and "217/353" in out
    assert "3013/19544" in out and "chip -> " in out


def test_eval_default_probes_skip_words_another_corpus_lacks(tmp_path, capsys):
    """The default probes are PTB words: a corpus without them is no user mistake."""
    pytest.importorskip("gensim")
    vocab = Vocab([UNK, "alpha", "beta", "chip"], np.array([0, 30, 20, 10]))
    table = np.eye(len(vocab), 4, dtype=np.float32) + 0.1
    save_outputs(tmp_path, Embeddings(table, table.copy(), vocab))
    assert main(["eval", "--run-dir", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and list(json.loads(out)["neighbours"]) == ["chip"]


def test_eval_without_gensim_says_how_to_install(vector_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)  # how Python spells "not installed"
    assert main(["eval", "--run-dir", str(vector_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-w2v: error: ") and err.count("\n") == 1
    assert "pip install gensim" in err and "pip install -e '.[eval]'" in err  # from a checkout


# -- evaluation during a 2-process run --------------------------------------------------------


def test_rank_zero_alone_evaluates_and_logs_to_wandb_under_torchrun(small_corpus, tmp_path):
    run_dir, logs, wandb_dir = tmp_path / "run", tmp_path / "torchrun-logs", tmp_path / "wandb"
    wandb_dir.mkdir()
    command = train_command(
        2, "--run-dir", str(run_dir), f"data.corpus={small_corpus}", *SMOKE,
        "train.batch_size=128", "log.every_steps=20", "eval.every_epochs=1",
        "eval.probes=stock,market,zzzz", "log.wandb=offline",
        torchrun_args=["--log-dir", str(logs), "--redirects", "3"],
    )
    code, output = run(command, tmp_path / "launch.log", timeout=180,
                       env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
                            "WANDB_SILENT": "true"})
    assert code == 0, output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    (last_epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert [(r["epoch"], r["global_step"]) for r in evals] == [(1, last_epoch["global_step"])]
    assert set(evals[0]["neighbours"]) == {"stock", "market"}
    if evals[0].get("benchmarks") is None:
        pytest.importorskip("gensim")  # benchmarks are logged whenever gensim is importable
    assert evals[0]["benchmarks"]["wordsim353"]["total"] == 353
    (rank0,) = logs.glob("*/attempt_0/0/stdout.log")
    (rank1,) = logs.glob("*/attempt_0/1/stdout.log")
    assert rank0.read_text().count("stock -> ") == 1
    assert "stock -> " not in rank1.read_text() and "wordsim353" not in rank1.read_text()
    assert len(list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1  # rank 0's only
