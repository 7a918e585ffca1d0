"""Word vectors in the formats other tools read: word2vec text and binary, or a plain .npy.

What is exported: the center table (the word vectors), rows in vocabulary order (descending
count). The ``<unk>`` row is left out of every format: it is never trained (unknown tokens are
dropped before training, and ``<unk>`` is never drawn as a negative), so it would only be a random
vector that other tools then offer as a neighbour. ``dist-w2v similar`` excludes it too, which
keeps gensim's ``most_similar`` on an export equal to ``similar`` on the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_w2v.errors import UserError
from dist_w2v.outputs.artifacts import Embeddings

FORMATS = ("word2vec-text", "word2vec-binary", "npy")


def exported_rows(emb: Embeddings) -> tuple[list[str], np.ndarray]:
    """The trained words and their float32 vectors, ``<unk>`` (row 0) left out."""
    return emb.vocab.idx_to_token[1:], np.ascontiguousarray(emb.center[1:], dtype=np.float32)


def write_word2vec_text(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """``V D`` header, then ``word x1 ... xD`` per line; 9 significant digits round-trip float32."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(f"{len(words)} {vectors.shape[1]}\n")
        row_format = " ".join(["%.9g"] * vectors.shape[1])
        for word, row in zip(words, vectors.tolist(), strict=True):
            out.write(f"{word} {row_format % tuple(row)}\n")


def write_word2vec_binary(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """The original word2vec C layout: text header, then ``word `` + D little-endian float32s +
    newline per word (gensim reads it with or without the newline; the C tools expect it)."""
    little = vectors.astype("<f4")
    with open(path, "wb") as out:
        out.write(f"{len(words)} {vectors.shape[1]}\n".encode())
        for word, row in zip(words, little, strict=True):
            out.write(word.encode("utf-8") + b" " + row.tobytes() + b"\n")


def npy_vocab_path(path: Path) -> Path:
    """Where the word list of an .npy export goes: ``vectors.npy`` -> ``vectors.vocab.txt``."""
    return path.with_suffix(".vocab.txt")


def write_npy(words: list[str], vectors: np.ndarray, path: Path) -> None:
    """A (V-1, D) float32 array, and the words one per line in row order beside it."""
    with open(path, "wb") as out:
        np.save(out, vectors)
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
