"""Word vectors in the formats other tools read: word2vec text and binary, or a plain .npy.

What is exported: the center table (the word vectors), rows in vocabulary order (descending
count). The ``<unk>`` row is left out of every format: it is never trained (unknown tokens are
dropped before training, and ``<unk>`` is never drawn as a negative), so it would only be a random
vector that other tools then offer as a neighbour. ``dist-w2v similar`` excludes it too, which
keeps gensim's ``most_similar`` on an export equal to ``similar`` on the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dist_w2v.errors import UserError
from dist_w2v.outputs.artifacts import Embeddings

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


def write_word2vec_text(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """``V D`` header, then ``word x1 ... xD`` per line; 9 significant digits round-trip float32."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(f"{len(words)} {vectors.shape[1]}\n")
        row_format = " ".join(["%.9g"] * vectors.shape[1])
        for start, block in row_blocks(vectors):
            names = words[start : start + len(block)]
            out.write("".join(f"{word} {row_format % tuple(row)}\n"
                              for word, row in zip(names, block.tolist(), strict=True)))


def write_word2vec_binary(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """The original word2vec C layout: text header, then ``word `` + D little-endian float32s +
    newline per word (gensim reads it with or without the newline; the C tools expect it)."""
    with open(path, "wb") as out:
        out.write(f"{len(words)} {vectors.shape[1]}\n".encode())
        for start, block in row_blocks(vectors):
            names = words[start : start + len(block)]
            out.write(b"".join(word.encode("utf-8") + b" " + row.tobytes() + b"\n"
                               for word, row in zip(names, block, strict=True)))


def npy_vocab_path(path: Path) -> Path:
    """Where the word list of an .npy export goes: ``vectors.npy`` -> ``vectors.vocab.txt``."""
    return path.with_suffix(".vocab.txt")


def write_npy(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """A (V-1, D) float32 array, and the words one per line in row order beside it.

    The bytes ``np.save`` writes for a float32 array, header first, then the rows block by block.
    """
    header = {"descr": "<f4", "fortran_order": False, "shape": tuple(vectors.shape)}
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for _, block in row_blocks(vectors):
            out.write(block.tobytes())
    npy_vocab_path(path).write_text("".join(w + "\n" for w in words), encoding="utf-8")


WRITERS = {
    "word2vec-text": write_word2vec_text,
    "word2vec-binary": write_word2vec_binary,
    "npy": write_npy,
}


def export_embeddings(emb: Embeddings, fmt: str, out: Path) -> list[Path]:
    """Write the word vectors in ``fmt`` to ``out``; returns the files written."""
    if fmt not in WRITERS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    words, vectors = exported_rows(emb)
    try:
        WRITERS[fmt](words, vectors, out)
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror}); choose a writable --out") from None
    return [out, npy_vocab_path(out)] if fmt == "npy" else [out]
