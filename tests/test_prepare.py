"""`dist-w2v prepare` and the prepared-corpus cache: real files, the real CLI where it matters,
and a plain-Python reference of the semantics (gensim's LineSentence cut, then d2l's vocabulary)."""

from __future__ import annotations

import bz2
import collections
import gzip
import lzma
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from dist_w2v.config import DataConfig
from dist_w2v.data import prepare as prepare_module
from dist_w2v.data import sources
from dist_w2v.data.prepare import prepare
from dist_w2v.data.prepared import PreparedWriter, PrepareSettings, load_prepared
from dist_w2v.errors import UserError
from dist_w2v.parallel.env import UserDirs

FILES = ("vocab.txt", "tokens.bin", "sentences.bin")


def reference(text: str, settings: PrepareSettings) -> tuple[list[str], list[int], list[int]]:
    """The semantics in plain Python: words, token ids and sentence lengths."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if settings.max_sentences:
        lines = lines[: settings.max_sentences]
    m = settings.max_sentence_length
    sentences = [raw[i:i + m] for raw in map(str.split, lines) for i in range(0, len(raw), m)]
    counter = collections.Counter(t for s in sentences for t in s)
    ranked = sorted(counter.items(), key=lambda item: item[1], reverse=True)  # stable: ties
    words = [t for t, c in ranked if c >= settings.min_count and t != "<unk>"]
    if settings.max_vocab:
        words = words[: settings.max_vocab]
    ids = {w: i for i, w in enumerate(words, 1)}
    tokens, lengths = [], []
    for sentence in sentences:
        known = [ids[t] for t in sentence if t in ids]
        if known:
            tokens += known
            lengths.append(len(known))
    return ["<unk>", *words], tokens, lengths


def contents(directory: Path) -> tuple[list[str], list[int], list[int]]:
    corpus = load_prepared(directory)
    return (corpus.vocab.idx_to_token, corpus.tokens.tolist(),
            np.diff(corpus.sentence_offsets).tolist())


def quiet_prepare(inputs, out, settings, **kwargs):
    return prepare(inputs, out, settings, say=lambda _: None, progress=False, **kwargs)


# ------------------------------------------------------------------------------ PTB


@pytest.fixture(scope="module")
def ptb_prepared(tmp_path_factory, ptb):
    out = tmp_path_factory.mktemp("ptb") / "prepared"
    result = run_cli("prepare", str(ptb / "ptb.train.txt"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_ptb_counts_and_summary(ptb_prepared):
    out, result = ptb_prepared
    corpus = load_prepared(out)
    assert len(corpus.vocab) == 6_719 and corpus.vocab.idx_to_token[0] == "<unk>"
    assert corpus.num_tokens == 820_056
    counts = corpus.manifest["counts"]
    assert counts["raw_tokens"] == 887_521
    assert counts["unknown_tokens"] == 887_521 - 820_056
    assert result.stdout.count("\n") == 1 and "820,056 tokens" in result.stdout
    assert "tokens/s" in result.stdout


def old_reader(path: Path, min_count: int) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """read_sentences + build_vocab + encode of the corpus reader that prepare replaces
    (dist_w2v/data/corpus.py at ee89123), verbatim but for the names: vocabulary, counts,
    token ids and each token's sentence number."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    sentences = [line.split() for line in lines]
    counter = collections.Counter(token for sentence in sentences for token in sentence)
    ranked = sorted(counter.items(), key=lambda item: item[1], reverse=True)
    idx_to_token = ["<unk>"] + [t for t, c in ranked if c >= min_count and t != "<unk>"]
    lookup = {t: i for i, t in enumerate(idx_to_token)}
    ids = [[lookup.get(t, 0) for t in s] for s in sentences]
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for s in ids for i in s), dtype=np.int64, count=int(lengths.sum()))
    sentence_ids = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    known = flat != 0
    counts = [0] + [counter[t] for t in idx_to_token[1:]]
    return idx_to_token, counts, flat[known], sentence_ids[known]


def test_ptb_matches_the_old_reader(ptb_prepared, ptb):
    words, counts, tokens, sentence_ids = old_reader(ptb / "ptb.train.txt", 10)
    corpus = load_prepared(ptb_prepared[0])
    assert corpus.vocab.idx_to_token == words
    assert corpus.vocab.counts.tolist() == counts
    assert np.array_equal(corpus.tokens, tokens)
    _, sentence_of_token = np.unique(sentence_ids, return_inverse=True)
    lengths = np.diff(corpus.sentence_offsets)
    assert np.array_equal(np.repeat(np.arange(lengths.shape[0]), lengths), sentence_of_token)


def test_second_run_is_up_to_date_and_rewrites_nothing(ptb_prepared, ptb):
    out, _ = ptb_prepared
    before = {name: (out / name).stat().st_mtime_ns for name in (*FILES, "manifest.json")}
    result = run_cli("prepare", str(ptb / "ptb.train.txt"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and result.stdout.count("\n") == 1
    assert before == {name: (out / name).stat().st_mtime_ns for name in before}


# ------------------------------------------------------------------- inputs and formats


@pytest.fixture
def text(small_corpus):
    return small_corpus.read_text()


def test_compressed_and_folder_inputs_give_the_same_corpus(tmp_path, small_corpus, text):
    settings = PrepareSettings(min_count=3)
    quiet_prepare([small_corpus], tmp_path / "plain", settings)
    expected = {name: (tmp_path / "plain" / name).read_bytes() for name in FILES}
    data = text.encode()
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress),
                             (".xz", lzma.compress)):
        path = tmp_path / f"small.txt{suffix}"
        path.write_bytes(compress(data))
        quiet_prepare([path], tmp_path / suffix[1:], settings)
        assert {n: (tmp_path / suffix[1:] / n).read_bytes() for n in FILES} == expected
    folder = tmp_path / "parts"
    (folder / "b").mkdir(parents=True)
    lines = text.splitlines(keepends=True)
    (folder / "a.txt").write_text("".join(lines[:700]))
    (folder / "b" / "c.txt.gz").write_bytes(gzip.compress("".join(lines[700:1500]).encode()))
    (folder / "b" / "d.txt").write_text("".join(lines[1500:]).rstrip("\n"))  # no final newline
    (folder / ".hidden.txt").write_text("hidden words are not read\n" * 50)
    (folder / ".git").mkdir()
    (folder / ".git" / "x.txt").write_text("nor these\n" * 50)
    quiet_prepare([folder], tmp_path / "folder", settings)
    assert {n: (tmp_path / "folder" / n).read_bytes() for n in FILES} == expected
    quiet_prepare([small_corpus], tmp_path / "tiny_blocks", settings, block_bytes=1000)
    assert {n: (tmp_path / "tiny_blocks" / n).read_bytes() for n in FILES} == expected


def test_out_inside_an_input_folder_is_not_read(tmp_path, text):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "corpus.txt").write_text(text)
    settings = PrepareSettings(min_count=3)
    quiet_prepare([folder], folder / "prepared", settings)
    assert quiet_prepare([folder], folder / "prepared", settings).up_to_date
    assert contents(folder / "prepared") == reference(text, settings)


def test_matches_reference_on_awkward_text(tmp_path, monkeypatch):
    """Unicode words and spaces, blank and whitespace-only lines, CRLF, over-long lines cut
    mid-block and across blocks, no final newline: all as the plain-Python reference. Tiny
    blocks merged into the word table every few blocks, as a large corpus is."""
    monkeypatch.setattr(prepare_module, "MERGE_WORDS", 1)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)] + ["äpfel", "日本", "<unk>", "naïve"]
    spaces = [" ", " ", " ", "  ", "\t", "\u3000", "\xa0", "\x1c", " \r"]
    lines = []
    for _ in range(400):
        length = rng.choice([0, 1, 3, 8, 20, 40, 150])
        words = [vocab[min(int(rng.paretovariate(1.0)) - 1, len(vocab) - 1)]
                 for _ in range(length)]
        line = "".join(w + rng.choice(spaces) for w in words)
        lines.append(rng.choice(["", " ", "\t"]) + line)
    text = "\n".join(lines)  # no final newline
    path = tmp_path / "awkward.txt"
    path.write_text(text, encoding="utf-8")
    for settings in (PrepareSettings(min_count=2, max_sentence_length=7),
                     PrepareSettings(min_count=1, max_sentence_length=2, max_vocab=10),
                     PrepareSettings(min_count=3, max_sentences=123)):
        for block_bytes in (64, 300, 1 << 20):
            out = tmp_path / f"out{block_bytes}"
            quiet_prepare([path], out, settings, block_bytes=block_bytes, force=True)
            assert contents(out) == reference(text, settings), (settings, block_bytes)


def test_single_line_corpus_is_cut(tmp_path, text):
    line = " ".join(text.split()[:30_000])  # text8's shape: one line, no newline
    path = tmp_path / "one_line.txt"
    path.write_text(line)
    settings = PrepareSettings(min_count=5, max_sentence_length=1000)
    quiet_prepare([path], tmp_path / "out", settings, block_bytes=4096)  # the line runs on
    words, tokens, lengths = contents(tmp_path / "out")
    assert (words, tokens, lengths) == reference(line, settings)
    assert len(lengths) == 30 and max(lengths) <= 1000


def test_progress_line_on_request(tmp_path, small_corpus, capsys):
    said = []
    prepare([small_corpus], tmp_path / "out", PrepareSettings(min_count=2), 1,
            say=said.append, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rprepare: counting") and err.endswith("\n") and "tokens/s" in err
    assert len(said) == 1 and "sentences" in said[0] and "tokens/s" in said[0]


def test_max_vocab_keeps_the_most_frequent(tmp_path, small_corpus, text):
    settings = PrepareSettings(min_count=2, max_vocab=50)
    quiet_prepare([small_corpus], tmp_path / "out", settings)
    corpus = load_prepared(tmp_path / "out")
    assert len(corpus.vocab) == 51
    counts = collections.Counter(t for t in text.split() if t != "<unk>")
    assert min(corpus.vocab.counts[1:]) >= sorted(counts.values(), reverse=True)[49]
    assert contents(tmp_path / "out") == reference(text, settings)


# ------------------------------------------------------------------ failures and integrity


def test_interrupted_prepare_leaves_nothing_training_accepts(tmp_path, small_corpus,
                                                             monkeypatch):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    load_prepared(out)
    calls = []

    def failing_add(self, tokens, lengths):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreparedWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare([small_corpus], out, PrepareSettings(min_count=3))
    assert calls
    with pytest.raises(UserError, match="interrupted"):
        load_prepared(out)
    assert not list(out.glob(".prepare-spill-*"))  # the temporary folder is gone


def test_damaged_files_are_refused(tmp_path, small_corpus):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    with open(out / "tokens.bin", "r+b") as handle:
        handle.truncate(os.path.getsize(out / "tokens.bin") - 4)
    with pytest.raises(UserError, match="tokens.bin"):
        load_prepared(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest"):
        load_prepared(out)
    # ... and a new prepare repairs it instead of calling it up to date
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    load_prepared(out)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-w2v: error:"), result.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok words here\ncaf\xe9 au lait\n".encode("latin-1"))
    assert "latin1.txt is not UTF-8" in one_line_error(
        run_cli("prepare", str(bad), "--out", str(tmp_path / "o1")))
    assert not (tmp_path / "o1" / "manifest.json").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    assert "empty" in one_line_error(run_cli("prepare", str(empty), "--out",
                                             str(tmp_path / "o2")))
    assert "not found" in one_line_error(run_cli("prepare", str(tmp_path / "missing.txt"),
                                                 "--out", str(tmp_path / "o3")))
    rare = tmp_path / "rare.txt"
    rare.write_text("each word once\n")
    assert "no word occurs at least 10 times" in one_line_error(
        run_cli("prepare", str(rare), "--out", str(tmp_path / "o4")))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write to --out" in one_line_error(
        run_cli("prepare", str(rare), "--out", str(blocker / "sub")))
    assert "min_count" in one_line_error(
        run_cli("prepare", str(rare), "--out", str(tmp_path / "o5"), "--min-count", "0"))
    # A flipped byte in the deflate stream: zlib's own error, not gzip's (no OSError).
    damaged = bytearray(gzip.compress(b"some words here\n" * 2000))
    damaged[14] ^= 0xFF
    corrupt = tmp_path / "corrupt.txt.gz"
    corrupt.write_bytes(bytes(damaged))
    assert "cannot read input" in one_line_error(
        run_cli("prepare", str(corrupt), "--out", str(tmp_path / "o6")))


# ------------------------------------------------------------------------------ the cache


def data_config(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


def test_cache_key_follows_content_and_settings(tmp_path, small_corpus):
    dirs = UserDirs(ptb=None, cache=tmp_path / "cache")
    said: list[str] = []
    first = sources.prepared_dir_for(data_config(corpus=str(small_corpus), min_count=3), dirs,
                                     said.append)
    assert first.parent == dirs.cache / "prepared"
    assert load_prepared(first).manifest["settings"]["min_count"] == 3
    assert said[0].startswith(f"preparing {small_corpus} into {first} (once")
    assert said[1].startswith(f"prepared {first}: ")  # not the temporary folder it was written to
    copy = tmp_path / "elsewhere" / "copy.txt"
    copy.parent.mkdir()
    shutil.copy(small_corpus, copy)
    said.clear()
    assert sources.prepared_dir_for(data_config(corpus=str(copy), min_count=3), dirs,
                                    said.append) == first
    assert said == []  # reused, not prepared again
    other = sources.prepared_dir_for(data_config(corpus=str(copy), min_count=4), dirs,
                                     said.append)
    assert other != first and load_prepared(other).manifest["settings"]["min_count"] == 4
    assert sorted(p.name for p in (dirs.cache / "prepared").iterdir()) == sorted(
        [first.name, other.name])  # no temporary folders left
    assert sources.prepared_dir_for(data_config(prepared=str(other)), dirs) == other
    with pytest.raises(UserError, match="not found"):
        sources.prepared_dir_for(data_config(corpus=str(tmp_path / "nope.txt")), dirs)


def test_a_concurrent_winner_is_used(tmp_path, small_corpus, monkeypatch):
    dirs = UserDirs(ptb=None, cache=tmp_path / "cache")
    cfg = data_config(corpus=str(small_corpus), min_count=3)
    real_prepare = prepare_module.prepare

    def prepare_and_lose(inputs, out, settings, **kwargs):
        real_prepare(inputs, out, settings, **kwargs)
        target = sources.cache_key(sources.file_checksum(small_corpus, "sha256", dirs.cache),
                                   settings)
        shutil.copytree(out, out.parent / target)  # another node finished first

    monkeypatch.setattr(prepare_module, "prepare", prepare_and_lose)
    path = sources.prepared_dir_for(cfg, dirs, lambda _: None)
    load_prepared(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_ptb_is_verified_once_and_a_tampered_copy_refused(tmp_path, ptb, monkeypatch):
    data = tmp_path / "ptb"
    data.mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt"):
        shutil.copy(ptb / name, data / name)
    dirs = UserDirs(ptb=data, cache=tmp_path / "cache")
    cfg = data_config(max_sentences=500)
    assert sources.ptb_split_path(cfg, dirs, "valid") == data / "ptb.valid.txt"
    path = sources.prepared_dir_for(cfg, dirs, lambda _: None)
    assert load_prepared(path).manifest["settings"]["max_sentences"] == 500

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(sources, "file_digest", no_hashing)
    assert sources.prepared_dir_for(cfg, dirs, lambda _: None) == path
    monkeypatch.undo()
    train = data / "ptb.train.txt"
    train.write_bytes(train.read_bytes().replace(b" the ", b" teh ", 1))
    with pytest.raises(UserError, match="SHA-1"):
        sources.prepared_dir_for(cfg, dirs, lambda _: None)
    with pytest.raises(UserError, match="not found"):
        sources.ptb_split_path(data_config(dir=str(tmp_path / "none")), dirs, "train")
