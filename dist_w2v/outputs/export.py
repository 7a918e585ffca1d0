"""Word vectors in the formats other tools read: word2vec text and binary, or a plain .npy.

What is exported: the center table (the word vectors), rows in vocabulary order (descending
count). The ``<unk>`` row is left out of every format: it is never trained (unknown tokens are
dropped before training, and ``<unk>`` is never drawn as a negative), so it would only be a random
vector that other tools then offer as a neighbour. ``dist-w2v similar`` excludes it too, which
keeps gensim's ``most_similar`` on an export equal to ``similar`` on the run.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dist_w2v.atomic import write_all
from dist_w2v.errors import UserError
from dist_w2v.outputs.artifacts import CENTER_FILE, RUN_FILES, Embeddings

FORMATS = ("word2vec-text", "word2vec-binary", "npy")


# Rows converted and written per write call: a 1M-word table is never copied, or turned into
# Python floats, as a whole (10,000 x 300 float32 is 12 MB).
EXPORT_ROWS = 10_000


def exported_rows(emb: Embeddings) -> tuple[list[str], np.ndarray]:
    """The trained words and their vectors, ``<unk>`` (row 0) left out; the vectors are a view
    of the center table (perhaps memory-mapped), made float32 block by block as they are written."""
    return emb.vocab.idx_to_token[1:], emb.center[1:]


def row_blocks(vectors: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows as little-endian float32), ``EXPORT_ROWS`` rows at a time."""
    for start in range(0, len(vectors), EXPORT_ROWS):
        yield start, np.ascontiguousarray(vectors[start : start + EXPORT_ROWS], dtype="<f4")


def write_word2vec_text(words: list[str], vectors: np.ndarray, out: BinaryIO) -> None:
    """``V D`` header, then ``word x1 ... xD`` per line; 9 significant digits round-trip float32."""
    out.write(f"{len(words)} {vectors.shape[1]}\n".encode())
    row_format = " ".join(["%.9g"] * vectors.shape[1])
    for start, block in row_blocks(vectors):
        names = words[start : start + len(block)]
        out.write("".join(f"{word} {row_format % tuple(row)}\n"
                          for word, row in zip(names, block.tolist(), strict=True)).encode())


def write_word2vec_binary(words: list[str], vectors: np.ndarray, out: BinaryIO) -> None:
    """The original word2vec C layout: text header, then ``word `` + D little-endian float32s +
    newline per word (gensim reads it with or without the newline; the C tools expect it)."""
    out.write(f"{len(words)} {vectors.shape[1]}\n".encode())
    for start, block in row_blocks(vectors):
        names = words[start : start + len(block)]
        out.write(b"".join(word.encode("utf-8") + b" " + row.tobytes() + b"\n"
                           for word, row in zip(names, block, strict=True)))


def npy_vocab_path(path: Path) -> Path:
    """Where the word list of an .npy export goes: ``vectors.npy`` -> ``vectors.vocab.txt``."""
    return path.with_suffix(".vocab.txt")


def write_npy(words: list[str], vectors: np.ndarray, out: BinaryIO) -> None:
    """A (V-1, D) float32 array; its words go beside it (:func:`write_npy_vocab`).

    The bytes ``np.save`` writes for a float32 array, header first, then the rows block by block.
    """
    header = {"descr": "<f4", "fortran_order": False, "shape": tuple(vectors.shape)}
    np.lib.format.write_array_header_1_0(out, header)
    for _, block in row_blocks(vectors):
        out.write(block.tobytes())


def write_npy_vocab(words: list[str], out: BinaryIO) -> None:
    """The words of an .npy export, one per line in row order."""
    out.write("".join(w + "\n" for w in words).encode("utf-8"))


WRITERS = {
    "word2vec-text": write_word2vec_text,
    "word2vec-binary": write_word2vec_binary,
    "npy": write_npy,
}


def protected(target: Path, sources: list[Path]) -> bool:
    """True when ``target`` is one of the files an export reads from or a run directory's own
    file (center.npy, config.yaml, checkpoints/..., in a folder that holds a run)."""
    target = target.resolve()
    if any(target == source.resolve() for source in sources):
        return True
    folder = target.parent
    looks_like_run = any((folder / name).exists() for name in ("config.yaml", CENTER_FILE,
                                                                 "checkpoints"))
    in_checkpoints = folder.name == "checkpoints" and (folder.parent / "config.yaml").exists()
    return (target.name in RUN_FILES and looks_like_run) or in_checkpoints


SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refuse_special(target: Path) -> None:
    """Refuse a ``target`` that exists as anything but a regular file. The write renames a
    temporary file over it, which would replace a device, FIFO or socket with a plain file,
    and a symbolic link with a copy, leaving the file it points to as it was."""
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot write {target} ({exc.strerror}); choose another --out") from None
    if stat.S_ISLNK(mode):
        raise UserError(f"refusing to write {target}: it is a symbolic link; give the file "
                        f"it points to ({target.resolve()}), or another name, to --out")
    if stat.S_ISDIR(mode):
        raise UserError(f"cannot write {target}: it is a folder; give a file name to --out")
    for is_kind, kind in SPECIAL_KINDS:
        if is_kind(mode):
            raise UserError(f"refusing to write {target}: it is {kind}, not a regular file; give "
                            "a file name to --out")


def export_embeddings(emb: Embeddings, fmt: str, out: Path,
                      sources: list[Path] | None = None) -> list[Path]:
    """Write the word vectors in ``fmt`` to ``out``; returns the files written.

    Every file is replaced atomically (all or nothing); ``out`` may not be a file the vectors
    come from (``sources``) or any run directory's own file.
    """
    if fmt not in WRITERS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.name:  # Path("") is Path("."): nothing to name the file after
        raise UserError(f"--out is empty or names no file ({str(out)!r}); give a file name, "
                        "e.g. --out vectors.txt")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    targets = [out, npy_vocab_path(out)] if fmt == "npy" else [out]
    for target in targets:
        if protected(target, sources or []):
            raise UserError(f"refusing to write {target}: it is a run's own file; choose an "
                            "--out outside the run's files (e.g. vectors.txt next to it)")
        refuse_special(target)
    words, vectors = exported_rows(emb)
    files: list[tuple[Path, Callable[[BinaryIO], object]]] = [
        (out, lambda handle: WRITERS[fmt](words, vectors, handle))]
    if fmt == "npy":
        files.append((targets[1], lambda handle: write_npy_vocab(words, handle)))
    try:
        write_all(files)
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); choose a writable --out "
                        "with free space (nothing was changed)") from None
    return targets
