"""`dist-w2v prepare` and the prepared-corpus cache: real files, the real CLI where it matters,
and a plain-Python reference of the semantics (gensim's LineSentence cut, then d2l's vocabulary)."""

from __future__ import annotations

import bz2
import collections
import fcntl
import gzip
import json
import lzma
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, run_cli

from dist_w2v.config import DataConfig
from dist_w2v.data import prepare as prepare_module
from dist_w2v.data import sources
from dist_w2v.data.examples import ExampleBuilder
from dist_w2v.data.prepare import prepare
from dist_w2v.data.prepared import PreparedWriter, PrepareSettings, load_prepared
from dist_w2v.data.stream import ChunkSource, whole_corpus
from dist_w2v.errors import UserError
from dist_w2v.folder_lock import open_lock
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


def test_an_interrupted_prepare_leaves_the_previous_corpus_as_it_was(tmp_path, small_corpus,
                                                                    monkeypatch):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []

    def failing_add(self, tokens, lengths):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreparedWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare([small_corpus], out, PrepareSettings(min_count=3))
    assert calls
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no spill, no temp files
    assert load_prepared(out).manifest["settings"]["min_count"] == 2


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
    assert f"--out {blocker / 'sub'} lies under a file, not a folder" in one_line_error(
        run_cli("prepare", str(rare), "--out", str(blocker / "sub")))
    assert "--min-count (data.min_count) must be >= 1" in one_line_error(
        run_cli("prepare", str(rare), "--out", str(tmp_path / "o5"), "--min-count", "0"))
    # A flipped byte in the deflate stream: zlib's own error, not gzip's (no OSError).
    damaged = bytearray(gzip.compress(b"some words here\n" * 2000))
    damaged[14] ^= 0xFF
    corrupt = tmp_path / "corrupt.txt.gz"
    corrupt.write_bytes(bytes(damaged))
    assert "cannot read input" in one_line_error(
        run_cli("prepare", str(corrupt), "--out", str(tmp_path / "o6")))


# ------------------------------------------------- one writer, and what training checks


def test_a_second_prepare_into_the_same_out_is_refused_while_the_first_runs(tmp_path, ptb):
    """The probe's repro: two prepares into one --out at once used to both exit 0 and leave a
    tokens.bin of both (and a segfault in training). The first is held just after it took the
    lock; the second is refused, naming it, and the first then finishes a whole corpus."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "dist_w2v.cli", "prepare",
                              str(ptb / "ptb.train.txt"), "--out", str(out), "--min-count", "1"],
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock = out / ".prepare.lock"
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        try:
            second = run_cli("prepare", str(ptb / "ptb.train.txt"), "--out", str(out),
                             "--min-count", "2000")
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0, first.communicate()
    finally:
        first.kill()
        first.communicate()
    line = one_line_error(second)
    assert f"--out {out} is being written by PID {first.pid} on host " in line
    corpus = load_prepared(out)
    assert corpus.manifest["settings"]["min_count"] == 1
    assert corpus.read_tokens(0, corpus.num_tokens).max() < len(corpus.vocab)


def test_a_reader_keeps_the_corpus_it_opened_when_the_folder_is_prepared_again(tmp_path,
                                                                               small_corpus):
    """A run reads its chunks throughout training: a new prepare into its folder must not
    change what it reads (the files are replaced by rename, not rewritten in place)."""
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=1))
    reading = load_prepared(out)
    before = reading.read_tokens(0, reading.num_tokens)
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=50))
    assert len(load_prepared(out).vocab) < len(reading.vocab)
    np.testing.assert_array_equal(reading.read_tokens(0, reading.num_tokens), before)
    np.testing.assert_array_equal(
        reading.read_sentence_offsets(0, reading.num_sentences), reading.sentence_offsets)


def edit_in_place(path: Path, dtype: str, index: int, value: int) -> None:
    """A same-size edit, which the manifest's sizes cannot see."""
    data = np.memmap(path, dtype=dtype, mode="r+")
    data[index] = value
    data.flush()
    del data


@pytest.mark.parametrize("edit", ["id at V", "huge id", "negative id", "boundary back"])
def test_same_size_edits_are_refused_as_they_are_read(tmp_path, small_corpus, edit):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    corpus = load_prepared(out)
    size = len(corpus.vocab)
    if edit == "boundary back":
        edit_in_place(out / "sentences.bin", "<i8", 10, int(corpus.sentence_offsets[9]) - 1)
        expected = "sentences.bin's boundaries"
    else:
        value = {"id at V": size, "huge id": 2**30, "negative id": -3}[edit]
        edit_in_place(out / "tokens.bin", "<i4", 1234, value)
        expected = f"tokens.bin holds id {value} at token 1,234, outside the vocabulary's 1.."
    corpus = load_prepared(out)  # sizes still match: accepted at load ...
    with pytest.raises(UserError, match=re.escape(expected)):  # ... refused as read
        source = ChunkSource(corpus, ExampleBuilder(corpus.vocab, DataConfig(),
                                                    torch.device("cpu")), 0, True)
        source.count(whole_corpus(corpus), 0)


def test_training_on_a_same_size_edit_is_one_line_not_a_crash(tmp_path, small_corpus):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    edit_in_place(out / "tokens.bin", "<i4", 5000, 2**30)  # a segfault before
    result = run_cli("train", "--config", str(REPO / "configs" / "ptb-quick.yaml"),
                     "--run-dir", str(tmp_path / "run"), f"data.prepared={out}",
                     "train.epochs=1")
    line = one_line_error(result)
    assert "tokens.bin holds id 1073741824 at token 5,000" in line
    assert f"dist-w2v prepare INPUT --out {out} --force" in line  # up to date, but damaged


def test_an_edited_vocabulary_is_refused_at_load(tmp_path, small_corpus):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    lines = (out / "vocab.txt").read_text().splitlines(keepends=True)
    lines[3], lines[4] = lines[4], lines[3]  # same size, other words at ids 4 and 5
    (out / "vocab.txt").write_text("".join(lines))
    with pytest.raises(UserError, match="vocab.txt does not match its SHA-256"):
        load_prepared(out)


# ------------------------------------------------------------- what --out and inputs may be


def test_out_holding_other_files_is_refused_unless_forced(tmp_path, small_corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "vocab.txt").write_text("my own notes\n")
    line = one_line_error(run_cli("prepare", str(small_corpus), "--out", str(out)))
    assert f"--out {out} already holds files (vocab.txt) and is no prepared corpus" in line
    assert (out / "vocab.txt").read_text() == "my own notes\n"
    assert run_cli("prepare", str(small_corpus), "--out", str(out), "--min-count", "2",
                   "--force").returncode == 0
    load_prepared(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    quiet_prepare([small_corpus], empty, PrepareSettings(min_count=2))  # an empty folder is fine


def test_a_failed_prepare_removes_the_folders_it_created_and_nothing_else(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    new = tmp_path / "new" / "out"
    assert "is empty" in one_line_error(run_cli("prepare", str(empty), "--out", str(new)))
    assert not (tmp_path / "new").exists()  # the parent it made too
    existing = tmp_path / "existing"
    existing.mkdir()
    one_line_error(run_cli("prepare", str(empty), "--out", str(existing)))
    assert existing.is_dir()


def test_a_killed_prepares_leftovers_are_removed_by_the_next(tmp_path, small_corpus):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    for settings in (PrepareSettings(min_count=2), PrepareSettings(min_count=3)):
        (out / ".prepare-spill-999999-abc").mkdir()  # a SIGKILLed prepare's, on any host
        (out / "tokens.bin.tmp").write_bytes(b"half")
        quiet_prepare([small_corpus], out, settings)  # up to date, then a real prepare
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [".prepare.lock", "manifest.json", *FILES])


def test_a_prepare_killed_before_its_manifest_is_written_is_redone_without_force(
        tmp_path, small_corpus):
    """The commit renames the files between removing the old manifest and writing the new one;
    a kill in that window leaves a prepare's files without a manifest, which are still ours."""
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest"):
        load_prepared(out)
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    load_prepared(out)


def test_a_prepare_killed_as_it_writes_its_manifest_is_redone_without_force(
        tmp_path, small_corpus):
    """A kill just before the manifest's rename leaves manifest.json.tmp; the next prepare
    called the folder "already holds files (manifest.json.tmp)" and wanted --force."""
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    (out / "manifest.json").rename(out / "manifest.json.tmp")
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".prepare.lock", "manifest.json", *FILES])
    load_prepared(out)


def test_a_failed_prepare_removes_only_the_empty_folders_it_made(tmp_path, small_corpus):
    """It removed the topmost folder it had made, whole: a second prepare's finished corpus,
    and a user's notes, put beside --out while the first ran, went with it."""
    cr_only = tmp_path / "cr.txt"
    cr_only.write_bytes(small_corpus.read_bytes().replace(b"\n", b"\r"))
    shared = tmp_path / "shared"
    beside = shared / "news"

    def meanwhile(line):  # the CR-only input is pointed out during the count: the user acts
        quiet_prepare([small_corpus], beside, PrepareSettings(min_count=2))
        (shared / "notes.txt").write_text("mine\n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([cr_only], shared / "wiki", PrepareSettings(min_count=1), say=lambda m: None,
                warn=meanwhile)
    assert not (shared / "wiki").exists()  # made by the failed prepare, and empty again
    assert (shared / "notes.txt").read_text() == "mine\n"
    load_prepared(beside)


def test_out_through_a_folder_not_made_yet_is_still_checked(tmp_path, small_corpus):
    """new/../folder reads as missing until new/ exists, so the folder-of-other-files check
    was skipped and the user's vocab.txt overwritten."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "vocab.txt").write_text("precious\n")
    with pytest.raises(UserError, match="already holds files"):
        quiet_prepare([small_corpus], tmp_path / "new" / ".." / "mine",
                      PrepareSettings(min_count=2))
    assert (folder / "vocab.txt").read_text() == "precious\n"
    assert not (tmp_path / "new").exists()


def test_paths_that_cannot_be_reached_are_one_line_errors(tmp_path, small_corpus):
    long_name = "x" * 300
    for args in ([str(small_corpus), "--out", str(tmp_path / long_name)],
                 [str(tmp_path / f"{long_name}.txt"), "--out", str(tmp_path / "o")]):
        assert "File name too long" in one_line_error(run_cli("prepare", *args))
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert f"--out {tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, which does not " \
        "exist" in one_line_error(run_cli("prepare", str(small_corpus), "--out",
                                          str(tmp_path / "gone")))
    with pytest.raises(UserError, match="cannot reach prepared corpus .*File name too long"):
        load_prepared(tmp_path / long_name)


def test_paths_under_a_folder_nobody_may_enter_are_one_line_errors(small_corpus):
    """Path.exists() and is_dir() raise PermissionError there: it was a traceback."""
    top = Path(tempfile.mkdtemp(prefix="dist-w2v-perm-"))
    try:
        (top / "locked" / "inner").mkdir(parents=True)
        shutil.copy(small_corpus, top / "locked" / "inner" / "a.txt")
        top.chmod(0o755)
        (top / "locked").chmod(0o000)
        inner = top / "locked" / "inner"
        said = as_nobody(
            "from dist_w2v.data.prepare import prepare\n"
            "from dist_w2v.data.prepared import PrepareSettings, load_prepared\n"
            "for inputs, out in (([sys.argv[1]], sys.argv[2]), ([sys.argv[3]], sys.argv[1])):\n"
            "    try:\n"
            "        prepare(inputs, out, PrepareSettings(min_count=1))\n"
            "    except UserError as exc:\n"
            "        print(exc)\n"
            "load_prepared(sys.argv[1])",
            str(inner / "a.txt"), str(top / "out"), str(top / "mine.txt"))
        lines = said.strip().splitlines()
        assert lines[0] == f"cannot reach input {inner / 'a.txt'} (Permission denied); fix " \
            "the path or its folders' permissions"
        assert lines[1].startswith(f"cannot use --out {inner / 'a.txt'} (Permission denied)")
        assert lines[2].startswith(f"cannot reach prepared corpus {inner / 'a.txt'} "
                                   "(Permission denied)")
    finally:
        (top / "locked").chmod(0o755)
        shutil.rmtree(top)


def test_a_prepared_corpus_inside_an_input_folder_is_not_read_as_text(tmp_path):
    """prepare nest --out nest/v1, then --out nest/v2: v1's manifest, vocab and binary files
    were read as text (the vocabulary held '{' and '"sha256":')."""
    nest = tmp_path / "nest"
    nest.mkdir()
    (nest / "a.txt").write_text("a b c\nb c a\nc a b\n")
    first = quiet_prepare([nest], nest / "v1", PrepareSettings(min_count=1))
    second = quiet_prepare([nest], nest / "v2", PrepareSettings(min_count=1))
    assert first.manifest["counts"]["raw_tokens"] == second.manifest["counts"]["raw_tokens"] == 9
    assert "is a prepared corpus, not text" in one_line_error(
        run_cli("prepare", str(nest / "v1"), "--out", str(tmp_path / "v3")))


@pytest.mark.parametrize("name, magic, hint", [
    ("a.txt", b"\x1f\x8b\x08\x00", "it is gzip data: name it .gz"),
    ("a.tgz", b"\x1f\x8b\x08\x00", "it is gzip data: name it .gz"),
    ("a.zip", b"PK\x03\x04", "it is a zip archive: unpack it"),
    ("a.txt", b"\xff\xfe\x00", "convert it to UTF-8"),
])
def test_a_compressed_file_under_another_name_is_named_as_such(tmp_path, name, magic, hint):
    path = tmp_path / name
    path.write_bytes(magic + bytes(range(128, 256)))
    line = one_line_error(run_cli("prepare", str(path), "--out", str(tmp_path / "o")))
    assert f"input {path} is not UTF-8 text (byte " in line and line.endswith(f"); {hint}")


@pytest.mark.parametrize("kind", ["utf-16", "zeros"])
def test_text_holding_nul_bytes_is_refused(tmp_path, small_corpus, kind):
    """Valid UTF-8, yet no text: UTF-16 without a byte-order mark prepared into a vocabulary
    of words like 't\0h\0e\0', and a file of zeros into one word, with exit 0."""
    path = tmp_path / "input.txt"
    text = small_corpus.read_text(encoding="utf-8")
    path.write_bytes(text.encode("utf-16-le") if kind == "utf-16" else bytes(100_000))
    line = one_line_error(run_cli("prepare", str(small_corpus), str(path), "--out",
                                  str(tmp_path / "o")))
    assert line == (f"dist-w2v: error: input {path} holds a NUL byte (byte "
                    f"{1 if kind == 'utf-16' else 0}): it is binary or UTF-16 text, not UTF-8; "
                    "convert it to UTF-8")
    assert not (tmp_path / "o").exists()


def test_an_edited_manifest_is_one_line(tmp_path, small_corpus):
    """Infinity as a size was an OverflowError; a tokens.bin of 4k+2 bytes, with the manifest
    edited to match, numpy's ValueError."""
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    original = (out / "manifest.json").read_text()
    manifest = json.loads(original)
    manifest["files"]["tokens.bin"]["bytes"] = float("inf")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="records sizes or checksums that are no whole numbers"):
        load_prepared(out)
    manifest = json.loads(original)
    with open(out / "tokens.bin", "ab") as tokens:
        tokens.write(b"\x01\x00")
    manifest["files"]["tokens.bin"]["bytes"] += 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a whole number of 4-byte values"):
        load_prepared(out)


def test_a_load_while_a_prepare_commits_says_so(tmp_path, small_corpus):
    """Between a re-prepare's old manifest and its new one (about 45 ms of fsyncs), a run
    starting on the folder was told it was "never prepared, or interrupted" and to --force."""
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    (out / "manifest.json").unlink()
    fd = open_lock(out / ".prepare.lock")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242 elsewhere\n", 0)
    try:
        with pytest.raises(UserError, match=f"prepared corpus {out} is being written by PID "
                                            "4242 on host elsewhere"):
            load_prepared(out)
    finally:
        os.close(fd)
    with pytest.raises(UserError, match="no manifest"):
        load_prepared(out)


def test_sigterm_stops_a_prepare_with_its_cleanup(tmp_path, ptb):
    """kill, timeout and scancel send SIGTERM: it ended the process where it stood, leaving
    the spill folder (4 bytes a token) and the folders it made."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as out:
        for _ in range(8):
            out.write((ptb / "ptb.train.txt").read_bytes())
    target = tmp_path / "new" / "deep" / "c"
    proc = subprocess.Popen([sys.executable, "-m", "dist_w2v.cli", "prepare", str(big),
                             "--out", str(target), "--workers", "1"], env=cli_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (target.is_dir() and any(target.glob(".prepare-spill-*"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_a_prepare_that_loses_the_lock_keeps_the_folder_it_made(tmp_path, small_corpus,
                                                               monkeypatch):
    """The probe's race: this prepare's mkdir made --out, another took the lock first. The
    refused one used to remove --out, and with it the other's corpus."""
    out = tmp_path / "out"
    real_make_folders = prepare_module.make_folders
    winner: list[int] = []

    def made_then_beaten(folder):
        created = real_make_folders(folder)
        fd = open_lock(folder / ".prepare.lock")  # another prepare's descriptor
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242 elsewhere\n", 0)
        winner.append(fd)
        return created

    monkeypatch.setattr(prepare_module, "make_folders", made_then_beaten)
    try:
        with pytest.raises(UserError, match="is being written by PID 4242 on host elsewhere"):
            quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
        assert (out / ".prepare.lock").is_file()
    finally:
        os.close(winner[0])


def test_another_tools_manifest_is_not_replaced(tmp_path, small_corpus):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my app"}')
    (app / "vocab.txt").write_text("my words 1\n")
    assert "holds a manifest.json that is not dist-w2v's" in one_line_error(
        run_cli("prepare", str(small_corpus), "--out", str(app)))
    assert (app / "manifest.json").read_text() == '{"name": "my app"}'


def test_an_up_to_date_read_only_corpus_needs_no_write_access(tmp_path, small_corpus):
    top = Path(tempfile.mkdtemp(prefix="dist-w2v-ro-"))
    try:
        shutil.copy(small_corpus, top / "a.txt")
        quiet_prepare([top / "a.txt"], top / "c", PrepareSettings(min_count=2))
        for path in (top, top / "a.txt", top / "c", *(top / "c").iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        said = as_nobody("from dist_w2v.data.prepare import prepare\n"
                         "from dist_w2v.data.prepared import PrepareSettings\n"
                         "prepare([sys.argv[1] + '/a.txt'], sys.argv[1] + '/c', "
                         "PrepareSettings(min_count=2))", str(top))
        assert said == f"{top / 'c'} is up to date (same inputs and settings); nothing to do\n"
    finally:
        shutil.rmtree(top)


def test_a_file_given_twice_or_linked_is_read_once(tmp_path, small_corpus, text):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(small_corpus, folder / "a.txt")
    (folder / "b.txt").symlink_to("a.txt")
    settings = PrepareSettings(min_count=2)
    outcome = quiet_prepare([folder, folder / "a.txt", small_corpus, small_corpus],
                            tmp_path / "out", settings)
    assert [Path(e["path"]).name for e in outcome.manifest["inputs"]] == ["a.txt", "small.txt"]
    assert contents(tmp_path / "out") == reference(text + text, settings)


def test_inputs_that_cannot_be_read_as_meant_are_one_line_errors(tmp_path, small_corpus):
    out = tmp_path / "out"
    quiet_prepare([small_corpus], out, PrepareSettings(min_count=2))
    line = one_line_error(run_cli("prepare", str(out / "tokens.bin"), str(small_corpus),
                                  "--out", str(out)))
    assert f"input {out / 'tokens.bin'} is a file that the prepare writes into --out" in line
    assert "lies inside --out" in one_line_error(
        run_cli("prepare", str(out), "--out", str(out)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert f"input {fifo} is not a regular file" in one_line_error(
        run_cli("prepare", str(fifo), "--out", str(tmp_path / "o1")))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(small_corpus, folder / "a.txt")
    (folder / "gone").symlink_to(tmp_path / "nowhere")
    assert f"input {folder / 'gone'} cannot be read" in one_line_error(
        run_cli("prepare", str(folder), "--out", str(tmp_path / "o2")))
    (folder / "gone").unlink()
    os.mkfifo(folder / "pipe")
    assert f"input {folder / 'pipe'} is not a regular file" in one_line_error(
        run_cli("prepare", str(folder), "--out", str(tmp_path / "o3")))


def as_nobody(code: str, *args: str) -> str:
    """Run ``code`` in a child that has imported dist_w2v and then, when we are root (who reads
    and writes everything), drops to nobody; its stdout, or a UserError's message."""
    drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
    body = "\n".join("    " + line for line in code.splitlines())
    child = subprocess.run(
        [sys.executable, "-c",
         # mmap: numpy imports it only when it first maps a file, too late for nobody
         "import mmap, os, sys\nimport dist_w2v.data.prepare\n"
         "from dist_w2v.errors import UserError\n"
         f"{drop}\ntry:\n{body}\nexcept UserError as exc:\n    print(exc)", *args],
        capture_output=True, text=True, env=cli_env({"PYTHONPATH": str(REPO)}), timeout=60)
    assert child.returncode == 0, child
    return child.stdout


def test_an_unreadable_subfolder_is_an_error_not_a_folder_left_out(small_corpus):
    """rglob used to skip it without a word (in a folder that nobody may enter)."""
    top = Path(tempfile.mkdtemp(prefix="dist-w2v-perm-"))
    try:
        (top / "in" / "locked").mkdir(parents=True)
        shutil.copy(small_corpus, top / "in" / "a.txt")
        shutil.copy(small_corpus, top / "in" / "locked" / "b.txt")
        for folder in (top, top / "in"):
            folder.chmod(0o755)
        (top / "in" / "locked").chmod(0o000)
        said = as_nobody("from pathlib import Path\n"
                         "from dist_w2v.data.prepare import folder_files\n"
                         "print(folder_files(Path(sys.argv[1])))", str(top / "in"))
        assert said.startswith(f"cannot read folder {top / 'in' / 'locked'} in input "
                               f"{top / 'in'}: Permission denied"), said
    finally:
        (top / "in" / "locked").chmod(0o755)
        shutil.rmtree(top)


def test_symlinked_folders_are_followed_and_each_folder_read_once(tmp_path, small_corpus, text):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    shutil.copy(small_corpus, real / "sub" / "a.txt")
    top = tmp_path / "top"
    top.mkdir()
    (top / "linked").symlink_to(real)
    (real / "loop").symlink_to(real)  # a link back up: neither followed forever nor twice
    settings = PrepareSettings(min_count=2)
    outcome = quiet_prepare([top], tmp_path / "out", settings)
    assert [Path(e["path"]).name for e in outcome.manifest["inputs"]] == ["a.txt"]
    assert contents(tmp_path / "out") == reference(text, settings)


def test_a_byte_order_mark_is_dropped_and_cr_only_lines_are_pointed_out(tmp_path):
    settings = PrepareSettings(min_count=1)
    plain = "alpha beta gamma\nbeta gamma\n"
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.encode())
    quiet_prepare([bom], tmp_path / "o1", settings)
    assert contents(tmp_path / "o1") == reference(plain, settings)
    mac = tmp_path / "mac.txt"
    mac.write_bytes(plain.replace("\n", "\r").encode())
    result = run_cli("prepare", str(mac), "--out", str(tmp_path / "o2"), "--min-count", "1")
    assert result.returncode == 0 and result.stdout.startswith("prepared "), result
    assert result.stderr.startswith(f"dist-w2v: warning: {mac} has carriage returns but no "
                                    "newline"), result.stderr


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


def test_a_killed_cache_prepares_folder_is_removed_by_the_next_on_its_host(tmp_path,
                                                                           small_corpus):
    dirs = UserDirs(ptb=None, cache=tmp_path / "cache")
    root = dirs.cache / "prepared"
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = sources.HOST
    abandoned = root / f".0123abcd.tmp-{dead.pid}@{host}-k7x2q9zz"
    running = root / f".0123abcd.tmp-{os.getpid()}@{host}-a1b2c3d4"
    elsewhere = root / f".0123abcd.tmp-{dead.pid}@another-{host}-e5f6g7h8"
    for folder in (abandoned, running, elsewhere):
        folder.mkdir()
    target = sources.prepared_dir_for(data_config(corpus=str(small_corpus), min_count=3), dirs,
                                      lambda _: None)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [target.name, running.name, elsewhere.name])


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
