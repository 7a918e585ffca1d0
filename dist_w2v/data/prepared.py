"""The prepared-corpus format: what ``dist-w2v prepare`` writes and training memory-maps.

A prepared corpus is a folder:

* ``vocab.txt``: the vocabulary in word2vec's ``-save-vocab`` text (data/vocab.py); line i is
  token id i, id 0 is ``<unk>``;
* ``tokens.bin``: the unk-free corpus as one flat array of little-endian int32 token ids;
* ``sentences.bin``: little-endian int64 offsets into ``tokens.bin``, one per sentence boundary
  (0 first, the token count last); every sentence holds at least one token;
* ``manifest.json``: format and version, the inputs (path, bytes, mtime), the settings, the
  counts and the size and SHA-256 of every file above. It is written last and atomically, and a
  new prepare removes it first, so a folder whose manifest is missing or disagrees with its
  files is never trained on.

Only this module knows the layout; everything else goes through :func:`load_prepared` and
:class:`PreparedWriter`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_w2v.atomic import write_text_atomically
from dist_w2v.data.vocab import Vocab, read_vocab_text, vocab_text
from dist_w2v.errors import UserError

FORMAT = "dist-w2v-prepared"
VERSION = 1
VOCAB_FILE = "vocab.txt"
TOKENS_FILE = "tokens.bin"
SENTENCES_FILE = "sentences.bin"
MANIFEST_FILE = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")
OFFSET_DTYPE = np.dtype("<i8")


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the prepared corpus besides its inputs (part of the cache key)."""

    min_count: int = 10
    """Words seen fewer times are unknown and dropped."""
    max_vocab: int = 0
    """Keep only the N most frequent words (0 = no limit)."""
    max_sentence_length: int = 10_000
    """Longer lines are cut into sentences of at most this many tokens (gensim's limit)."""
    max_sentences: int = 0
    """Read only the first N lines (0 = all); for smoke runs."""

    def __post_init__(self) -> None:
        for name, low in (("min_count", 1), ("max_vocab", 0), ("max_sentence_length", 2),
                          ("max_sentences", 0)):
            if getattr(self, name) < low:
                raise UserError(f"prepare: {name} must be >= {low} (got {getattr(self, name)})")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PreparedCorpus:
    """A prepared corpus, memory-mapped: ranks on one node share its pages."""

    directory: Path
    manifest: dict[str, Any]
    vocab: Vocab
    tokens: np.ndarray  # (N,) int32 memmap
    sentence_offsets: np.ndarray  # (S+1,) int64 memmap

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop), read from the file into memory of our own: slicing the map
        instead would keep every page it touched resident (and counted) for the whole run."""
        return _read(self.directory / TOKENS_FILE, TOKEN_DTYPE, start, stop)

    def read_sentence_offsets(self, first: int, last: int) -> np.ndarray:
        """Sentence boundaries [first, last], read like :meth:`read_tokens`."""
        return _read(self.directory / SENTENCES_FILE, OFFSET_DTYPE, first, last + 1)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_sentences(self) -> int:
        return int(self.sentence_offsets.shape[0]) - 1

    def word_sentences(self) -> list[list[str]]:
        """The sentences as words, unknowns dropped (for peers such as gensim: small corpora)."""
        words = np.asarray(self.vocab.idx_to_token, dtype=object)[np.asarray(self.tokens)]
        return [list(s) for s in np.split(words, np.asarray(self.sentence_offsets[1:-1]))]

    @property
    def fingerprint(self) -> str:
        """Identifies the token stream: the SHA-256 of tokens.bin, as the manifest records it."""
        return str(self.manifest["files"][TOKENS_FILE]["sha256"])


def _bad(directory: Path, why: str) -> UserError:
    return UserError(f"{directory} is not a usable prepared corpus ({why}); run "
                     f"`dist-w2v prepare INPUT --out {directory}` again")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none (an unprepared or interrupted folder)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _bad(directory, f"{MANIFEST_FILE} unreadable: {exc.__class__.__name__}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(directory, f"{MANIFEST_FILE} is not a dist-w2v manifest")
    if manifest.get("version") != VERSION:
        raise _bad(directory, f"format version {manifest.get('version')}, this dist-w2v reads "
                              f"{VERSION}")
    return manifest


def load_prepared(directory: str | Path) -> PreparedCorpus:
    """Open a prepared corpus after checking that every file is the size its manifest says."""
    directory = Path(directory).expanduser()
    if directory.is_file():
        raise UserError(f"prepared corpus {directory} is a file, not a folder written by "
                        "`dist-w2v prepare`; to train on a text file, set data.corpus instead")
    if not directory.is_dir():
        raise UserError(f"prepared corpus {directory} not found; create it with "
                        f"`dist-w2v prepare INPUT --out {directory}`")
    manifest = read_manifest(directory)
    if manifest is None:
        raise _bad(directory, f"no {MANIFEST_FILE}: never prepared, or the prepare was "
                              "interrupted")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise _bad(directory, f"{name} is missing or not the size its manifest records")
    tokens = _memmap(directory / TOKENS_FILE, TOKEN_DTYPE)
    offsets = _memmap(directory / SENTENCES_FILE, OFFSET_DTYPE)
    vocab = read_vocab_text(directory / VOCAB_FILE)
    if len(vocab) != manifest["counts"]["vocab_size"]:
        raise _bad(directory, f"{VOCAB_FILE} has {len(vocab)} words, the manifest "
                              f"{manifest['counts']['vocab_size']}")
    if offsets.shape[0] < 1 or int(offsets[-1]) != tokens.shape[0]:
        raise _bad(directory, f"{SENTENCES_FILE} does not end at the token count")
    return PreparedCorpus(directory, manifest, vocab, tokens, offsets)


def _read(path: Path, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
    with open(path, "rb") as handle:
        return np.fromfile(handle, dtype=dtype, count=stop - start, offset=start * dtype.itemsize)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """A file's hex digest, read in 16 MB blocks (files here can be gigabytes)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one output file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


class PreparedWriter:
    """Writes a prepared corpus into ``directory``: tokens and sentences as they come, then the
    vocabulary and, last, the manifest. Until :meth:`commit`, the folder has no manifest."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MANIFEST_FILE).unlink(missing_ok=True)
        self._tokens = open(self.directory / TOKENS_FILE, "wb")  # noqa: SIM115 - closed in commit
        self._offsets = open(self.directory / SENTENCES_FILE, "wb")  # noqa: SIM115
        self._offsets.write(np.zeros(1, dtype=OFFSET_DTYPE).tobytes())
        self.num_tokens = 0
        self.num_sentences = 0

    def add(self, tokens: np.ndarray, sentence_lengths: np.ndarray) -> None:
        """Append sentences: their tokens back to back, and each one's length (all >= 1)."""
        self._tokens.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        ends = self.num_tokens + np.cumsum(sentence_lengths, dtype=np.int64)
        self._offsets.write(ends.astype(OFFSET_DTYPE).tobytes())
        self.num_tokens += int(tokens.shape[0])
        self.num_sentences += int(sentence_lengths.shape[0])

    def commit(self, vocab: Vocab, inputs: list[dict[str, Any]], settings: PrepareSettings,
               counts: dict[str, int]) -> dict[str, Any]:
        """Close the streams, write the vocabulary, then the manifest (atomically, last)."""
        for handle in (self._tokens, self._offsets):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        (self.directory / VOCAB_FILE).write_text(vocab_text(vocab), encoding="utf-8")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "inputs": inputs,
            "settings": settings.to_dict(),
            "counts": {**counts, "tokens": self.num_tokens, "sentences": self.num_sentences,
                       "vocab_size": len(vocab)},
            "files": {name: file_entry(self.directory / name)
                      for name in (VOCAB_FILE, TOKENS_FILE, SENTENCES_FILE)},
        }
        write_text_atomically(self.directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        for handle in (self._tokens, self._offsets):
            handle.close()
