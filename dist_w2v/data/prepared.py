"""The prepared-corpus format: what ``dist-w2v prepare`` writes and training memory-maps.

A prepared corpus is a folder:

* ``vocab.txt``: the vocabulary in word2vec's ``-save-vocab`` text (data/vocab.py); line i is
  token id i, id 0 is ``<unk>``;
* ``tokens.bin``: the unk-free corpus as one flat array of little-endian int32 token ids;
* ``sentences.bin``: little-endian int64 offsets into ``tokens.bin``, one per sentence boundary
  (0 first, the token count last); every sentence holds at least one token;
* ``manifest.json``: format and version, the inputs (path, bytes, mtime), the settings, the
  counts and the size and SHA-256 of every file above.

A prepare writes the three files under temporary names and renames them into place at the end,
removing the old manifest just before and writing the new one (atomically) just after: an
interrupted prepare leaves the previous corpus as it was (a kill between those two leaves files
without a manifest: refused, and redone by the next prepare), and a run that has the folder open
keeps reading the files it opened (their old inodes), never a mix of two prepares.

What training checks (cheap enough for every run of a billion-token corpus): at load, every
file's size and vocab.txt's SHA-256; as it reads, that every token id lies in the vocabulary and
every sentence boundary increases. tokens.bin's and sentences.bin's SHA-256s are recorded (the
corpus fingerprint that checkpoints keep) but not re-read: a same-size edit of them that keeps
the ids in range is not noticed.

Only this module knows the layout; everything else goes through :func:`load_prepared` and
:class:`PreparedWriter`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from dist_w2v.atomic import (
    commit,
    discard,
    open_temp,
    staged,
    temp_path,
    write_text_atomically,
)
from dist_w2v.data.vocab import Vocab, parse_vocab_text, vocab_text
from dist_w2v.errors import UserError
from dist_w2v.folder_lock import holder_now

FORMAT = "dist-w2v-prepared"
VERSION = 1
VOCAB_FILE = "vocab.txt"
TOKENS_FILE = "tokens.bin"
SENTENCES_FILE = "sentences.bin"
MANIFEST_FILE = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")
OFFSET_DTYPE = np.dtype("<i8")
DATA_FILES = (VOCAB_FILE, TOKENS_FILE, SENTENCES_FILE)
LOCK_FILE = ".prepare.lock"
"""Held (flock) by the one prepare writing the folder (folder_lock.py)."""


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
                flag = "--" + name.replace("_", "-")
                raise UserError(f"prepare: {flag} (data.{name}) must be >= {low} "
                                f"(got {getattr(self, name)})")

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
    _token_file: IO[bytes] = field(repr=False)
    _offset_file: IO[bytes] = field(repr=False)

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop), read from the file into memory of our own (slicing the map
        instead would keep every page it touched resident, and counted, for the whole run);
        refused when an id lies outside the vocabulary."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise _bad(self.directory, f"{SENTENCES_FILE} points at tokens [{start:,}, "
                                       f"{stop:,}) of {self.num_tokens:,}")
        ids = _pread(self._token_file, TOKEN_DTYPE, start, stop - start)
        if ids.shape[0] and (int(ids.min()) < 1 or int(ids.max()) >= len(self.vocab)):
            at = int(np.flatnonzero((ids < 1) | (ids >= len(self.vocab)))[0])
            raise _bad(self.directory, f"{TOKENS_FILE} holds id {int(ids[at])} at token "
                                       f"{start + at:,}, outside the vocabulary's 1.."
                                       f"{len(self.vocab) - 1}: it changed after the prepare")
        return ids

    def read_sentence_offsets(self, first: int, last: int) -> np.ndarray:
        """Sentence boundaries [first, last], read like :meth:`read_tokens`; refused unless
        they increase (every sentence holds a token) within the token count."""
        if not 0 <= first <= last <= self.num_sentences:
            raise ValueError(f"sentences [{first}, {last}] of {self.num_sentences}")
        bounds = _pread(self._offset_file, OFFSET_DTYPE, first, last - first + 1)
        steps = np.diff(bounds)
        if int(bounds[0]) < 0 or int(bounds[-1]) > self.num_tokens or (
                steps.shape[0] and int(steps.min()) < 1):
            raise _bad(self.directory, f"{SENTENCES_FILE}'s boundaries {first:,}..{last:,} do "
                                       "not increase within the token count: it changed "
                                       "after the prepare")
        return bounds

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_sentences(self) -> int:
        return int(self.sentence_offsets.shape[0]) - 1

    def word_sentences(self) -> list[list[str]]:
        """The sentences as words, unknowns dropped (for peers such as gensim: small corpora)."""
        ids = self.read_tokens(0, self.num_tokens)
        bounds = self.read_sentence_offsets(0, self.num_sentences)
        words = np.asarray(self.vocab.idx_to_token, dtype=object)[ids]
        return [list(s) for s in np.split(words, bounds[1:-1])]

    @property
    def fingerprint(self) -> str:
        """Identifies the token stream: the SHA-256 of tokens.bin, as the manifest records it."""
        return str(self.manifest["files"][TOKENS_FILE]["sha256"])

    @property
    def identity(self) -> str:
        """Tells two prepares apart (the SHA-256s of every file), whatever the folder's path:
        ranks on different nodes may read copies of one corpus at different paths."""
        files = self.manifest["files"]
        return " ".join(str(files[name]["sha256"]) for name in DATA_FILES)


def _bad(directory: Path, why: str) -> UserError:
    return UserError(f"{directory} is not a usable prepared corpus ({why}); prepare it again "
                     f"with `dist-w2v prepare INPUT --out {directory} --force` (a folder in "
                     "the cache: delete it, and the next run prepares it again)")


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


def manifest_kind(directory: Path) -> str:
    """What ``directory/manifest.json`` is: "none", "ours" (a dist-w2v manifest, any version),
    "damaged" (unreadable as JSON) or "other" (another tool's JSON, not ours to replace)."""
    try:
        raw = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "none"
    except (OSError, ValueError):
        return "damaged"
    return "ours" if isinstance(raw, dict) and raw.get("format") == FORMAT else "other"


def looks_prepared(directory: Path) -> bool:
    """The three data files are there in their shapes (whole int32 ids; int64 boundaries from
    0): a prepare's files whose manifest was lost, e.g. to a kill just before it was written."""
    directory = Path(directory)
    try:
        with open(directory / SENTENCES_FILE, "rb") as handle:
            starts_at_zero = handle.read(OFFSET_DTYPE.itemsize) == bytes(OFFSET_DTYPE.itemsize)
        return (starts_at_zero and (directory / VOCAB_FILE).is_file()
                and (directory / SENTENCES_FILE).stat().st_size % OFFSET_DTYPE.itemsize == 0
                and (directory / TOKENS_FILE).stat().st_size % TOKEN_DTYPE.itemsize == 0)
    except OSError:
        return False


def load_prepared(directory: str | Path) -> PreparedCorpus:
    """Open a prepared corpus after checking every file's size and vocab.txt's SHA-256 against
    its manifest (the ids and boundaries are checked as they are read)."""
    directory = Path(directory).expanduser()
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise UserError(f"prepared corpus {directory} not found; create it with "
                        f"`dist-w2v prepare INPUT --out {directory}`") from None
    except OSError as exc:  # a folder on the way that cannot be entered, a name too long
        raise UserError(f"cannot reach prepared corpus {directory} ({exc.strerror}); fix the "
                        "path or its folders' permissions") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"prepared corpus {directory} is a file, not a folder written by "
                        "`dist-w2v prepare`; to train on a text file, set data.corpus instead")
    manifest = read_manifest(directory)
    if manifest is None:
        writer = holder_now(directory / LOCK_FILE)
        if writer is not None:  # between a re-prepare's old manifest and its new one
            raise UserError(f"prepared corpus {directory} is being written by {writer} (a "
                            "dist-w2v prepare); start again once it has finished")
        raise _bad(directory, f"no {MANIFEST_FILE}: never prepared, or the prepare was "
                              "interrupted")
    sizes, vocab_sha256, vocab_size = _recorded(manifest, directory)
    # Opened once, before any check: a prepare that replaces the files later leaves this
    # corpus reading the ones checked here.
    with contextlib.ExitStack() as opened:
        try:
            handles = {name: opened.enter_context(open(directory / name, "rb"))
                       for name in DATA_FILES}
        except OSError:
            raise _bad(directory, "a file its manifest lists is missing or unreadable") from None
        for name, handle in handles.items():
            if os.fstat(handle.fileno()).st_size != sizes[name]:
                raise _bad(directory, f"{name} is not the size its manifest records")
        for name, dtype in ((TOKENS_FILE, TOKEN_DTYPE), (SENTENCES_FILE, OFFSET_DTYPE)):
            if sizes[name] % dtype.itemsize:
                raise _bad(directory, f"{name} is {sizes[name]:,} bytes, not a whole number "
                                      f"of {dtype.itemsize}-byte values")
        vocab_bytes = handles[VOCAB_FILE].read()
        if hashlib.sha256(vocab_bytes).hexdigest() != vocab_sha256:
            raise _bad(directory, f"{VOCAB_FILE} does not match its SHA-256 in the manifest: "
                                  "it changed after the prepare")
        vocab = parse_vocab_text(vocab_bytes, directory / VOCAB_FILE)
        if len(vocab) != vocab_size:
            raise _bad(directory, f"{VOCAB_FILE} has {len(vocab)} words, the manifest "
                                  f"{vocab_size}")
        tokens = _memmap(handles[TOKENS_FILE], TOKEN_DTYPE)
        offsets = _memmap(handles[SENTENCES_FILE], OFFSET_DTYPE)
        if offsets.shape[0] < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != tokens.shape[0]:
            raise _bad(directory, f"{SENTENCES_FILE} does not run from 0 to the token count")
        opened.pop_all()  # the corpus keeps the token and sentence files open
    handles[VOCAB_FILE].close()
    return PreparedCorpus(directory, manifest, vocab, tokens, offsets,
                          handles[TOKENS_FILE], handles[SENTENCES_FILE])


def _recorded(manifest: dict[str, Any], directory: Path) -> tuple[dict[str, int], str, int]:
    """What the manifest records of the files: sizes, vocab.txt's SHA-256, the vocab size."""
    try:
        files = manifest["files"]
        sizes = {name: files[name]["bytes"] for name in DATA_FILES}
        vocab_size = manifest["counts"]["vocab_size"]
        sha256s = [files[name]["sha256"] for name in DATA_FILES]
    except (KeyError, TypeError):
        raise _bad(directory, f"{MANIFEST_FILE} lacks the files' sizes and checksums") from None
    counts = [*sizes.values(), vocab_size]
    if not all(type(n) is int and n >= 0 for n in counts) or not all(  # json: no bools, inf
            isinstance(h, str) for h in sha256s):
        raise _bad(directory, f"{MANIFEST_FILE} records sizes or checksums that are no "
                              "whole numbers or hex digests: it was edited")
    return sizes, sha256s[0], vocab_size


def _pread(handle: IO[bytes], dtype: np.dtype, start: int, count: int) -> np.ndarray:
    """``count`` items from item ``start`` on; positional, so threads may share the handle."""
    out = np.empty(count, dtype=dtype)
    view = memoryview(out).cast("B")
    done = 0
    while done < view.nbytes:
        got = os.preadv(handle.fileno(), [view[done:]], start * dtype.itemsize + done)
        if got == 0:
            raise OSError(f"{handle.name} ended early")
        done += got
    return out


def _memmap(handle: IO[bytes], dtype: np.dtype) -> np.ndarray:
    if os.fstat(handle.fileno()).st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(handle, dtype=dtype, mode="r")


def _digest(handle: IO[bytes], algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    while block := handle.read(1 << 24):
        digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """A file's hex digest, read in 16 MB blocks (files here can be gigabytes)."""
    with open(path, "rb") as handle:
        return _digest(handle, algorithm)


def file_entry(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one output file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


class PreparedWriter:
    """Writes a prepared corpus into ``directory``: tokens and sentences as they come, under
    temporary names, then the vocabulary; :meth:`commit` renames them into place between
    removing the old manifest and writing the new one."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tokens = open_temp(self.directory / TOKENS_FILE)
        self._offsets = open_temp(self.directory / SENTENCES_FILE)
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
        """Close the streams, write the vocabulary, rename all three into place, then write
        the manifest (atomically, last)."""
        for handle in (self._tokens, self._offsets):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        with staged(self.directory / VOCAB_FILE) as handle:
            handle.write(vocab_text(vocab).encode("utf-8"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "inputs": inputs,
            "settings": settings.to_dict(),
            "counts": {**counts, "tokens": self.num_tokens, "sentences": self.num_sentences,
                       "vocab_size": len(vocab)},
            "files": {name: file_entry(temp_path(self.directory / name))
                      for name in DATA_FILES},
        }
        (self.directory / MANIFEST_FILE).unlink(missing_ok=True)
        commit([self.directory / name for name in DATA_FILES])
        write_text_atomically(self.directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        """Close and remove the temporary files; the folder's previous corpus is untouched."""
        for handle in (self._tokens, self._offsets):
            handle.close()
        discard([self.directory / name for name in DATA_FILES])


def work_files(directory: Path) -> list[Path]:
    """Temporary files a killed prepare may have left in ``directory``."""
    return [temp_path(Path(directory) / name) for name in (*DATA_FILES, MANIFEST_FILE)]
