"""`dist-w2v export` read back by gensim, and `dist-w2v similar` on the same trained run."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE, run_cli

from dist_w2v.cli import main
from dist_w2v.data.vocab import UNK, Vocab
from dist_w2v.errors import UserError
from dist_w2v.outputs import export
from dist_w2v.outputs.artifacts import Embeddings, load_run, save_outputs

# Known words, an unknown one, a capitalised known one, <unk> (not a word), then more known ones.
WORDS = ["stock", "qwertyzz", "Market", "<unk>", "market", "company", "million"]
KNOWN = ["stock", "market", "company", "million"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ptb) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
                     "data.max_sentences=2000", *SMOKE, "train.batch_size=128")
    assert result.returncode == 0, result.stderr
    return run_dir


def vocab_words(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "vocab.json").read_text())["idx_to_token"]


def parse_similar(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """`similar` output for several words: a ``word:`` header, then ``cosine sim=X: w`` lines."""
    answers: dict[str, list[tuple[str, float]]] = {}
    for line in stdout.splitlines():
        if line.endswith(":") and not line.startswith("cosine"):
            current = answers.setdefault(line[:-1], [])
        else:
            score, word = line.removeprefix("cosine sim=").split(": ")
            current.append((word, float(score)))
    return answers


@pytest.fixture(scope="module")
def similar_result(trained) -> subprocess.CompletedProcess:
    return run_cli("similar", "--run-dir", str(trained), *WORDS, "-k", "5")


@pytest.fixture(scope="module")
def similar_answers(similar_result) -> dict[str, list[tuple[str, float]]]:
    return parse_similar(similar_result.stdout)


@pytest.mark.parametrize("fmt, binary", [("word2vec-text", False), ("word2vec-binary", True)])
def test_word2vec_export_loads_in_gensim(trained, similar_answers, tmp_path, capsys, fmt, binary):
    models = pytest.importorskip("gensim.models")
    out = tmp_path / "vectors"
    assert main(["export", "--run-dir", str(trained), "--format", fmt, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    kv = models.KeyedVectors.load_word2vec_format(str(out), binary=binary)
    words = vocab_words(trained)
    assert kv.index_to_key == words[1:]  # every trained word, in vocabulary order, no <unk>
    assert "<unk>" not in kv.key_to_index
    center = np.load(trained / "center.npy")
    np.testing.assert_array_equal(kv.vectors, center[1:])  # bit for bit, text format included
    for word, expected in similar_answers.items():
        got = kv.most_similar(word, topn=5)
        assert [w for w, _ in got] == [w for w, _ in expected], word
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=6e-4)


def test_npy_export_from_a_checkpoint(trained, tmp_path, capsys):
    checkpoint = sorted((trained / "checkpoints").glob("*.pt"))[-1]
    out = tmp_path / "vectors.npy"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "npy",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(out), "wrote",
                                               str(tmp_path / "vectors.vocab.txt")]
    # The checkpoint written at the end of training holds the final tables.
    np.testing.assert_array_equal(np.load(out), np.load(trained / "center.npy")[1:])
    assert (tmp_path / "vectors.vocab.txt").read_text().split("\n")[:-1] == vocab_words(trained)[1:]


def test_export_into_a_missing_folder_is_a_user_error(trained, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "folder" / "v.txt"
    assert main(["export", "--run-dir", str(trained), "--format", "word2vec-text",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-w2v: error: cannot write {out}: folder {out.parent} does not exist; "
        "create it first"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-w2v: error: "), err
    return lines[0]


def damage(path: Path, content) -> None:
    """``content``: an array to save, bytes to write, a JSON value, or None to delete ``path``."""
    if content is None:
        path.unlink()
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))


def assert_refused_by_every_reader(run_dir: Path, out: Path, *fragments: str) -> None:
    """similar, eval and export each exit 2 with one line holding ``fragments``; nothing is
    written."""
    for command in (["similar", "--run-dir", str(run_dir), "stock"],
                    ["eval", "--run-dir", str(run_dir)],
                    ["export", "--run-dir", str(run_dir), "--format", "word2vec-text",
                     "--out", str(out)]):
        result = run_cli(*command)
        assert result.returncode == 2 and result.stdout == "", (command, result.stderr)
        line = one_error_line(result.stderr)
        assert all(fragment in line for fragment in fragments), (command, line)
    assert not out.exists()


@pytest.fixture
def run_dir_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns(
        "checkpoints")))


@pytest.mark.parametrize("name, table, problem", [
    ("center.npy", np.zeros(7, dtype=np.float32), "is not a 2-D table of floats (a 1-D array"),
    ("center.npy", np.array([["a", "b"]] * 3), "is not a 2-D table of floats (a 2-D array of <U1"),
    ("center.npy", np.zeros((3, 16), dtype=np.float32), "has 3 rows but the vocabulary"),
    ("context.npy", np.zeros((5, 16), dtype=np.float32), "has 5 rows but the vocabulary"),
    ("context.npy", "other width", "x 3 but center.npy"),  # as many rows, other width
    ("center.npy", "no columns", "has no columns (a table of 0 dimensions)"),
    ("center.npy", b"", "is corrupt (not a .npy table)"),  # np.load raised EOFError
    ("context.npy", b"\x93NUMPY garbage", "is corrupt (not a .npy table)"),
    ("context.npy", None, "is missing; the run directory is incomplete"),
])
def test_a_damaged_run_table_is_named_in_one_line(trained, run_dir_copy, tmp_path, name, table,
                                                  problem):
    if isinstance(table, str):
        words = len(vocab_words(trained))
        table = np.zeros((words, 3 if table == "other width" else 0), dtype=np.float32)
    damage(run_dir_copy / name, table)
    assert_refused_by_every_reader(run_dir_copy, tmp_path / "v.txt",
                                   f"error: {run_dir_copy / name} ", problem)


@pytest.mark.parametrize("content, problem", [
    ("ints", "vocab idx_to_token is not a list of words"),
    ("one string", "vocab idx_to_token is not a list of words"),
    ("short counts", "words but"),
    ("float counts", "vocab counts is not a list of counts"),
    ("no unk", "vocab word 0 is 'stock', not <unk>"),
    ({"idx_to_token": ["<unk>"]}, "vocab must hold exactly idx_to_token and counts"),
    (b"{not json", "it is not JSON"),
    (None, "is missing; the run directory is incomplete"),
])
def test_a_damaged_run_vocabulary_is_named_in_one_line(trained, run_dir_copy, tmp_path, content,
                                                       problem):
    """Before, numbers for words crashed export and made eval print nan with exit 0; fewer
    counts than words, or the words as one string, loaded as if nothing were wrong."""
    raw = json.loads((trained / "vocab.json").read_text())
    words, counts = raw["idx_to_token"], raw["counts"]
    content = {
        "ints": {"idx_to_token": list(range(len(words))), "counts": counts},
        "one string": {"idx_to_token": " ".join(words), "counts": counts},
        "short counts": {"idx_to_token": words, "counts": counts[:-1]},
        "float counts": {"idx_to_token": words, "counts": [float(c) for c in counts]},
        "no unk": {"idx_to_token": ["stock", *words[1:]], "counts": counts},
    }.get(content, content) if isinstance(content, str) else content
    damage(run_dir_copy / "vocab.json", content)
    assert_refused_by_every_reader(run_dir_copy, tmp_path / "v.txt",
                                   f"error: vocabulary file {run_dir_copy / 'vocab.json'} ",
                                   problem)


def make_special(kind: str, path: Path) -> None:
    if kind == "character device":
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 7))  # like /dev/full
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()


@pytest.mark.parametrize("kind", ["character device", "FIFO", "socket"])
def test_export_refuses_an_out_that_is_not_a_regular_file(trained, tmp_path, capsys, kind):
    """The write renames a temp file over --out, which would replace the device or FIFO."""
    out = tmp_path / "special"
    try:
        make_special(kind, out)
    except PermissionError:
        pytest.skip(f"cannot make a {kind} here")
    before = out.lstat()
    assert main(["export", "--run-dir", str(trained), "--format", "word2vec-text",
                 "--out", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"dist-w2v: error: refusing to write {out}: it is a {kind}, not a regular file; give a "
        "file name to --out")
    after = out.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


@pytest.mark.parametrize("fmt", ["word2vec-text", "npy"])
def test_export_refuses_a_symlink_and_names_its_target(trained, tmp_path, capsys, fmt):
    target = tmp_path / "kept.txt"
    target.write_text("mine\n")
    link = tmp_path / ("link.npy" if fmt == "npy" else "link.txt")
    link.symlink_to(target)
    assert main(["export", "--run-dir", str(trained), "--format", fmt, "--out", str(link)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"dist-w2v: error: refusing to write {link}: it is a symbolic link; give the file it "
        f"points to ({target}), or another name, to --out")
    assert link.is_symlink() and target.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kept.txt", link.name])


def test_export_refuses_an_empty_out(trained):
    """Path("") is Path("."), whose empty name made the .npy export's vocab path a ValueError."""
    result = run_cli("export", "--run-dir", str(trained), "--format", "npy", "--out", "")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "--out" in line and "empty" in line
    emb = load_run(trained)
    for out in ("", "/"):
        with pytest.raises(UserError, match=r"^--out is empty or names no file \('[./]'\); give "
                           "a file name"):
            export.export_embeddings(emb, "npy", Path(out))


def test_similar_answers_known_words_and_names_each_unknown_one(similar_result, similar_answers):
    assert similar_result.returncode == 2
    assert list(similar_answers) == KNOWN and all(len(a) == 5 for a in similar_answers.values())
    assert not any(w == word for word, found in similar_answers.items() for w, _ in found)
    errors = similar_result.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("dist-w2v: error: unknown word ") for e in errors)
    assert "'qwertyzz'" in errors[0] and "'<unk>'" in errors[2]
    assert errors[1].endswith("try 'market'")  # the vocabulary is lower-case


# -- writing block by block gives the bytes a whole-table write gives -------------------------


def whole_table_bytes(fmt: str, words: list[str], vectors: np.ndarray) -> bytes:
    """The export as one write of the whole float32 table: the reference for the blocked writers."""
    header = f"{len(words)} {vectors.shape[1]}\n"
    if fmt == "word2vec-text":
        row_format = " ".join(["%.9g"] * vectors.shape[1])
        lines = [f"{w} {row_format % tuple(row)}\n"
                 for w, row in zip(words, vectors.tolist(), strict=True)]
        return (header + "".join(lines)).encode()
    if fmt == "word2vec-binary":
        rows = [w.encode() + b" " + row.tobytes() + b"\n"
                for w, row in zip(words, vectors, strict=True)]
        return header.encode() + b"".join(rows)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_blocked_export_equals_whole_table_write(tmp_path, monkeypatch, fmt):
    words = [UNK] + [f"w{i}" for i in range(1, 6719)] + ["café"]  # PTB's size, one non-ASCII
    center = np.random.default_rng(0).standard_normal((len(words), 20)).astype(np.float32)
    save_outputs(tmp_path, Embeddings(center, center, Vocab(words, np.ones(len(words)))))
    monkeypatch.setattr(export, "EXPORT_ROWS", 1000)  # 7 blocks, the last one short
    out = tmp_path / "vectors.out"
    assert main(["export", "--run-dir", str(tmp_path), "--format", fmt, "--out", str(out)]) == 0
    assert out.read_bytes() == whole_table_bytes(fmt, words[1:], center[1:])


def test_run_tables_are_memory_mapped_not_read(tmp_path):
    center = np.ones((5, 3), dtype=np.float32)
    save_outputs(tmp_path, Embeddings(center, center, Vocab([UNK, "a", "b", "c", "d"],
                                                            np.ones(5))))
    emb = load_run(tmp_path)
    assert isinstance(emb.center, np.memmap) and isinstance(emb.context, np.memmap)
    assert not emb.center.flags.writeable
