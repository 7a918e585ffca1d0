"""The vocabulary: index <-> word and each word's count, and the two files it is kept in.

Index 0 is ``<unk>``: unknown words are dropped from sentences before anything else (d2l 14.3),
so it is never trained and never drawn as a negative. Words 1..V-1 are sorted by descending
count, ties in order of first occurrence.

Files: a prepared corpus keeps it as word2vec's ``-save-vocab`` text (``word count`` per line,
most frequent first; line i is word i, ``<unk>`` is not listed); a run directory and a
checkpoint keep it as JSON (``to_dict``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_w2v.errors import UserError

UNK = "<unk>"


@dataclass
class Vocab:
    """Index <-> token, and each token's count in the unk-free corpus (index 0 is <unk>)."""

    idx_to_token: list[str]
    counts: np.ndarray
    """int64 whatever it is given as (a list, floats): to_dict must save ints."""

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, 0)

    def index(self, token: str) -> int:
        """The index of a known word; a one-line error for an unknown one."""
        idx = self.token_to_idx.get(token, 0)
        if idx == 0:
            raise UserError(
                f"unknown word {token!r}: it is not in the vocabulary ({len(self)} words)"
            )
        return idx

    def to_dict(self) -> dict[str, list]:
        """The form saved in vocab.json and in checkpoints."""
        return {"idx_to_token": self.idx_to_token, "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, list]) -> Vocab:
        """The inverse of :meth:`to_dict`, of a dict that :func:`dict_problem` passed."""
        return cls(list(raw["idx_to_token"]), raw["counts"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"vocabulary file {path} is missing; the run directory is "
                            "incomplete, retrain or use a checkpoint") from None
        except (OSError, ValueError):
            raw = None
        problem = "it is not JSON" if raw is None else dict_problem(raw)
        if problem is not None:
            raise UserError(f"vocabulary file {path} is corrupt ({problem}); retrain or use a "
                            "checkpoint")
        return cls.from_dict(raw)


def dict_problem(raw: object) -> str | None:
    """What keeps ``raw`` from being a :meth:`Vocab.to_dict` (in a few words), or None.

    Checked on every load, of a run directory or a checkpoint: a list of numbers for words, or
    fewer counts than words, would otherwise load and fail (or score nan) deep inside eval and
    export."""
    if type(raw) is not dict or sorted(raw) != ["counts", "idx_to_token"]:
        return "vocab must hold exactly idx_to_token and counts"
    words, counts = raw["idx_to_token"], raw["counts"]
    if type(words) is not list or not all(type(w) is str for w in words):
        return "vocab idx_to_token is not a list of words"
    if type(counts) is not list or not all(type(c) is int and c >= 0 for c in counts):
        return "vocab counts is not a list of counts"
    if len(words) != len(counts):
        return f"vocab has {len(words)} words but {len(counts)} counts"
    if not words or words[0] != UNK:
        return f"vocab word 0 is {words[0] if words else None!r}, not {UNK}"
    return None


def vocab_text(vocab: Vocab) -> str:
    """word2vec's ``-save-vocab`` text: ``word count`` per line, <unk> (index 0) left out."""
    return "".join(f"{t} {int(c)}\n" for t, c in zip(vocab.idx_to_token[1:], vocab.counts[1:],
                                                       strict=True))


def parse_vocab_text(data: bytes, path: Path) -> Vocab:
    """The inverse of :func:`vocab_text`, of the bytes of a file (``path`` names it in errors);
    a one-line error for a malformed file."""
    words, counts = [UNK], [0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"vocabulary file {path} cannot be read ({exc}); "
                        "prepare the corpus again") from None
    for number, line in enumerate(text.split("\n")[:-1] if text.endswith("\n")
                                  else text.split("\n"), 1):
        word, _, count = line.rpartition(" ")
        if not word or not count.isdigit():
            raise UserError(f"vocabulary file {path} line {number} is not 'word count'; "
                            "prepare the corpus again")
        words.append(word)
        counts.append(int(count))
    return Vocab(words, counts)
