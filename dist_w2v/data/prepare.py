"""``dist-w2v prepare``: whitespace-tokenized text in, a prepared corpus (data/prepared.py) out.

Semantics (DESIGN.md, d2l 14.3, gensim's LineSentence): one sentence per line, tokens split on
Unicode whitespace exactly as ``str.split()``; a line longer than ``max_sentence_length`` raw
tokens is cut into pieces of at most that many raw tokens (so a one-line corpus such as text8
works); the vocabulary is every word with count >= min_count except ``<unk>``, by descending
count, ties in order of first occurrence, cut to ``max_vocab`` words (``<unk>`` not counted) and
preceded by ``<unk>`` at id 0; unknown tokens are dropped and pieces left empty are not written.

How (two passes, memory = the distinct words plus a few blocks):

1. The input is read in blocks of about 8 MB cut at a newline (inside one over-long line: at a
   space, and the line carries over to the next block). Worker threads run pyarrow compute
   kernels on each block, which release the GIL: UTF-8 validation (a cast), ``split_pattern``
   into lines, trim and split on whitespace (the ASCII kernels for a pure-ASCII block, 1.7x
   faster, same result), ``list_value_length`` (raw tokens per line) and one hashing pass,
   ``dictionary_encode``: the block's words in first-occurrence order and an int32 id per token.
   The block's ids and line lengths are spilled to a temporary folder inside ``--out``. The main
   thread merges the blocks' words into one table in block order (:class:`WordCounts`), which
   keeps the global first-occurrence order that breaks count ties, and adds up their counts.
2. The vocabulary is fixed. Per block (threads again), the local ids are remapped to vocabulary
   ids with two numpy gathers, unknown ones are dropped, and the sentence lengths come from a
   cumulative count of known tokens at the (raw) piece boundaries; :class:`PreparedWriter`
   writes them, and the manifest last.

Why pyarrow (measured on a shared 2-core box, Zipf corpus with 2M possible words, CPU time per
raw token): splitting and hashing a 16 MB block costs 176 ns/token on one core, 137 of them in
``dictionary_encode``; ``collections.Counter(bytes.split())`` costs about 480 ns/token (one
Python object per token), a Python-dict merge of the blocks' words 4x pyarrow's. Whole job
against gensim's ``build_vocab(corpus_file)`` on 50M tokens: 14.2 s CPU against 33.3 s, and
25.6 s against 84.2 s wall with 2 threads (benchmarks/prepare_bench.py). pyarrow is one wheel
without further dependencies, maintained by the Apache Arrow project.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dist_w2v.data.prepared import (
    DATA_FILES,
    LOCK_FILE,
    MANIFEST_FILE,
    PreparedWriter,
    PrepareSettings,
    load_prepared,
    looks_prepared,
    manifest_kind,
    read_manifest,
    work_files,
)
from dist_w2v.data.vocab import UNK, Vocab
from dist_w2v.errors import UserError
from dist_w2v.folder_lock import holding, make_folders, open_lock, unmake_folders
from dist_w2v.parallel.cores import usable_cores

BLOCK_BYTES = 8 << 20
"""Bytes of text per block: large enough to amortise the per-block merge, small enough that
a few blocks in flight per worker stay well under a GB."""
MERGE_WORDS = 1 << 18
"""Blocks' words wait for a merge until there are this many (or twice the table's size)."""
SPILL_PREFIX = ".prepare-spill-"
OPENERS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".gz": lambda p: gzip.open(p, "rb"),
    ".bz2": lambda p: bz2.open(p, "rb"),
    ".xz": lambda p: lzma.open(p, "rb"),
}
# Python's str.split() treats these ASCII controls as whitespace; pyarrow's ASCII splitter not.
_ASCII_EXTRA_SPACE = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")
_CUT_SPACE = b" \t\r\x0b\x0c"  # where an over-long line may be cut: never inside a UTF-8 char


@dataclass
class PrepareOutcome:
    directory: Path
    manifest: dict[str, Any]
    up_to_date: bool
    """True when an existing prepared corpus matched the inputs and settings (nothing done)."""
    seconds: float


# ---------------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Sequence[str | Path], out: Path) -> list[Path]:
    """Files as given, folders as their files (recursively, sorted, hidden names and prepared
    corpora skipped, symlinks followed), every file once; files inside ``out`` are left out of
    folders, and naming one that the prepare would overwrite is refused."""
    out_real = out.resolve()
    written = {out_real / name for name in (*DATA_FILES, MANIFEST_FILE)}
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"input {path} not found; give text files or folders of them"
                            ) from None
        except OSError as exc:  # a folder on the way that cannot be entered, a name too long
            raise UserError(f"cannot reach input {path} ({exc.strerror}); fix the path or its "
                            "folders' permissions") from None
        if stat.S_ISDIR(mode):
            if path.resolve().is_relative_to(out_real):
                raise UserError(f"input folder {path} lies inside --out {out}, where the "
                                "prepare writes; give --out a folder of its own")
            if manifest_kind(path) == "ours":
                raise UserError(f"input folder {path} is a prepared corpus, not text; give "
                                "the text files it was prepared from")
            found = [p for p in folder_files(path) if not p.resolve().is_relative_to(out_real)]
            if not found:
                raise UserError(f"input folder {path} holds no files"
                                + (f" outside --out {out}" if out_real.is_relative_to(
                                    path.resolve()) else ""))
            files.extend(found)
        elif stat.S_ISREG(mode):
            if path.resolve() in written:
                raise UserError(f"input {path} is a file that the prepare writes into --out "
                                f"{out}; give --out another folder")
            files.append(path)
        else:
            raise UserError(f"input {path} is not a regular file (a FIFO, socket or device); "
                            "give text files or folders of them")
    return _each_once(files)


def _each_once(files: list[Path]) -> list[Path]:
    """Every file once, in the order first given: a file named twice, inside a folder that is
    also given, or linked from a second name would otherwise count its words twice."""
    seen: set[tuple[int, int]] = set()
    unique = []
    for path in files:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            unique.append(path)
    return unique


def folder_files(folder: Path) -> list[Path]:
    """The regular files under ``folder``, sorted; a folder that cannot be read, a broken
    link or a FIFO is a one-line error rather than a file quietly left out."""

    def unreadable(exc: OSError) -> None:
        raise UserError(f"cannot read folder {exc.filename} in input {folder}: "
                        f"{exc.strerror}; fix its permissions or leave it out") from None

    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        here = os.stat(root)
        seen.add((here.st_dev, here.st_ino))
        keep = []
        for name in sorted(dirs):
            if name.startswith(".") or manifest_kind(Path(root, name)) == "ours":
                continue  # hidden, or a prepared corpus (an earlier --out): its files are no text
            info = os.stat(os.path.join(root, name))
            if (info.st_dev, info.st_ino) not in seen:  # a link back up, or a second link
                seen.add((info.st_dev, info.st_ino))
                keep.append(name)
        dirs[:] = keep
        for name in names:
            if name.startswith("."):
                continue
            path = Path(root, name)
            try:
                info = os.stat(path)
            except OSError as exc:
                raise UserError(f"input {path} cannot be read ({exc.strerror}: a broken link?); "
                                "fix or remove it") from None
            if not stat.S_ISREG(info.st_mode):
                raise UserError(f"input {path} is not a regular file (a FIFO, socket or "
                                "device); remove it from the folder, or name the files to read")
            found.append(path)
    return sorted(found)


def input_entries(files: Sequence[Path]) -> list[dict[str, Any]]:
    """What the manifest records of each input: an unchanged entry means an unchanged file."""
    entries = []
    for path in files:
        try:
            info = path.stat()
        except OSError as exc:
            raise UserError(f"input {path} cannot be read ({exc.strerror}); was it removed?"
                            ) from None
        entries.append({"path": str(path.resolve()), "bytes": info.st_size,
                        "mtime_ns": info.st_mtime_ns})
    return entries


def open_input(path: Path) -> IO[bytes]:
    opener = OPENERS.get(path.suffix.lower())
    return opener(path) if opener else open(path, "rb")  # noqa: SIM115 - caller closes


@dataclass
class Block:
    """About BLOCK_BYTES of text: whole lines, except that an over-long line may run on."""

    index: int
    data: bytes
    sources: list[tuple[Path, int, int, int]]
    """(file, start, end, offset in the file) of each file's part of ``data``, for errors."""
    runs_on: bool
    """The block ends inside a line, which the next block continues."""


def _file_pieces(path: Path, block_bytes: int,
                 notice: Callable[[str], None]) -> Iterator[tuple[bytes, bool]]:
    """A file's (uncompressed) bytes in pieces that end at a newline, else at a space, and
    then the line runs on into the next piece. A UTF-8 byte-order mark is dropped."""
    carry = b""
    line_open = False  # a piece ended inside a line
    newline_seen = return_seen = False
    try:
        with open_input(path) as handle:
            first = True
            while chunk := handle.read(block_bytes):
                if first:
                    chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
                if not newline_seen:
                    return_seen = return_seen or b"\r" in chunk
                data = carry + chunk if carry else chunk
                cut = data.rfind(b"\n") + 1
                if cut:
                    newline_seen = True
                    yield data[:cut], False
                    carry, line_open = data[cut:], False
                    continue
                cut = max(data.rfind(c) for c in _CUT_SPACE) + 1
                if cut:
                    yield data[:cut], True
                    carry, line_open = data[cut:], True
                else:
                    carry = data  # one token longer than a block: read on
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        # zlib.error (corrupt deflate data in a .gz) is no OSError, unlike gzip's own errors.
        raise UserError(f"cannot read input {path}: {exc}") from None
    if carry or line_open:  # the last line, without its newline
        yield carry + b"\n", False
    if return_seen and not newline_seen:
        notice(f"warning: {path} has carriage returns but no newline, so it was read as one "
               "line (cut every --max-sentence-length tokens); if its lines end in CR alone, "
               "convert them with `tr '\\r' '\\n'` and prepare again")


def read_blocks(files: Sequence[Path], notice: Callable[[str], None],
                block_bytes: int = BLOCK_BYTES, max_lines: int = 0) -> Iterator[Block]:
    """The inputs as blocks; small files share one. ``max_lines`` > 0 stops after that many.
    ``notice`` gets a line about an input that is read, but perhaps not as meant."""
    parts: list[bytes] = []
    sources: list[tuple[Path, int, int, int]] = []
    size = 0
    lines_left = max_lines
    index = 0
    for path in files:
        offset = 0
        for piece, runs_on in _file_pieces(path, block_bytes, notice):
            if max_lines:
                newlines = piece.count(b"\n")
                if newlines >= lines_left:
                    cut = 0
                    for _ in range(lines_left):
                        cut = piece.index(b"\n", cut) + 1
                    piece, runs_on = piece[:cut], False
                lines_left -= min(newlines, lines_left)
            if piece:
                parts.append(piece)
                sources.append((path, size, size + len(piece), offset))
                size += len(piece)
                offset += len(piece)
            if size and (size >= block_bytes or runs_on or (max_lines and not lines_left)):
                yield Block(index, b"".join(parts), sources, runs_on)
                index += 1
                parts, sources, size = [], [], 0
            if max_lines and not lines_left:
                return
    if size:
        yield Block(index, b"".join(parts), sources, False)


# ------------------------------------------------------------------------- pass 1: count


@dataclass
class BlockScan:
    """One block after pass 1: its distinct words and counts; ids and lines are spilled."""

    index: int
    words: Any  # pyarrow StringArray, first-occurrence order (None once merged)
    counts: np.ndarray | None
    num_tokens: int
    num_lines: int
    last_line_tokens: int
    runs_on: bool
    num_bytes: int


def _spill_paths(spill: Path, index: int) -> tuple[Path, Path, Path]:
    stem = spill / f"block-{index:07d}"
    return (stem.with_suffix(".ids"), stem.with_suffix(".lines"), stem.with_suffix(".map"))


def _spill(array: np.ndarray, path: Path) -> None:
    """``array.tofile(path)``, but a failed write keeps the OS's error ("No space left on
    device"), which tofile turns into "N requested and M written"."""
    with open(path, "wb") as handle:
        handle.write(memoryview(np.ascontiguousarray(array)))


COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip data: name it .gz", b"BZh": "bzip2 data: name it .bz2",
                    b"\xfd7zXZ\x00": "xz data: name it .xz",
                    b"PK\x03\x04": "a zip archive: unpack it",
                    b"\x28\xb5\x2f\xfd": "zstd data: decompress it"}


def _not_text_hint(head: bytes) -> str:
    """How to fix an input that is not UTF-8: a compressed file under a plain name is named."""
    for magic, what in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return f"it is {what}"
    return "convert it to UTF-8"


def _refuse_nul(block: Block) -> None:
    """NUL is valid UTF-8 but never text: UTF-16 without a byte-order mark, or a binary file,
    passed the UTF-8 check and became a vocabulary of garbage (a file of zeros, one word)."""
    for path, start, end, offset in block.sources:
        at = block.data.find(b"\x00", start, end)
        if at >= 0:
            raise UserError(f"input {path} holds a NUL byte (byte {offset + at - start:,}"
                            f"{' uncompressed' if path.suffix in OPENERS else ''}): it is binary "
                            "or UTF-16 text, not UTF-8; convert it to UTF-8")


def _as_text(block: Block) -> Any:
    """The block as a one-element pyarrow string array; the cast validates UTF-8 (first: its
    message names compressed data, whose magic numbers may hold a NUL)."""
    raw = pa.Array.from_buffers(pa.binary(), 1, [
        None, pa.py_buffer(np.array([0, len(block.data)], dtype=np.int32)),
        pa.py_buffer(block.data)])
    try:
        text = raw.cast(pa.string())
        _refuse_nul(block)
        return text
    except pa.ArrowInvalid:
        for path, start, end, offset in block.sources:
            try:
                block.data[start:end].decode("utf-8")
            except UnicodeDecodeError as exc:
                head = block.data[start:start + 8] if offset == 0 else b""
                raise UserError(f"input {path} is not UTF-8 text (byte {offset + exc.start:,}"
                                f"{' uncompressed' if path.suffix in OPENERS else ''}); "
                                f"{_not_text_hint(bytes(head))}") from None
        raise UserError(f"input {block.sources[0][0]} is not UTF-8 text; "
                        "convert it to UTF-8") from None


def scan_block(block: Block, spill: Path) -> BlockScan:
    """Pass 1 for one block (runs in a worker thread; pyarrow releases the GIL)."""
    text = _as_text(block)
    lines = pc.split_pattern(text, "\n").flatten()
    if not block.runs_on:
        lines = lines.slice(0, len(lines) - 1)  # the empty string after the final newline
    ascii_only = pc.string_is_ascii(text)[0].as_py() and not any(
        c in block.data for c in _ASCII_EXTRA_SPACE)
    trim, split = ((pc.ascii_trim_whitespace, pc.ascii_split_whitespace) if ascii_only else
                   (pc.utf8_trim_whitespace, pc.utf8_split_whitespace))
    # Arrow's split keeps an empty string for leading and trailing whitespace; str.split()
    # does not. Trimmed first, only a blank line still gives one (its only "token").
    lines = trim(lines)
    tokens = split(lines)
    line_tokens = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int32)
    flat = tokens.flatten()
    blank = pc.binary_length(lines).to_numpy(zero_copy_only=False) == 0
    if blank.any():
        line_tokens[blank] = 0
        flat = flat.filter(pc.greater(pc.binary_length(flat), 0))
    encoded = pc.dictionary_encode(flat)
    ids = encoded.indices.to_numpy(zero_copy_only=False)
    ids_path, lines_path, _ = _spill_paths(spill, block.index)
    _spill(ids.astype(np.int32, copy=False), ids_path)
    _spill(line_tokens, lines_path)
    return BlockScan(
        index=block.index, words=encoded.dictionary,
        counts=np.bincount(ids, minlength=len(encoded.dictionary)),
        num_tokens=int(ids.shape[0]), num_lines=int(line_tokens.shape[0]),
        last_line_tokens=int(line_tokens[-1]) if line_tokens.shape[0] else 0,
        runs_on=block.runs_on, num_bytes=len(block.data))


class WordCounts:
    """Every distinct word once, in order of first occurrence, with its count so far.

    Blocks are merged in order, a few at a time, by one more ``dictionary_encode`` over the
    words so far followed by the new blocks' words: the words so far keep their ids (they come
    first and are distinct), new words get the next ids in order of first occurrence, and
    pyarrow's hashing runs without the GIL at about 4x the speed of a Python dict. Merging
    once the waiting blocks hold twice as many words as the table bounds the hashing to 1.5
    times the blocks' distinct words."""

    def __init__(self, spill: Path) -> None:
        self.spill = spill
        self.words = pa.array([], type=pa.large_string())
        self.counts = np.zeros(0, dtype=np.int64)
        self.waiting: list[BlockScan] = []
        self.waiting_words = 0

    def add(self, scan: BlockScan) -> None:
        """Take one block's words (blocks in order); merge when enough are waiting."""
        self.waiting.append(scan)
        self.waiting_words += len(scan.words)
        if self.waiting_words >= max(2 * len(self.words), MERGE_WORDS):
            self.merge()

    def merge(self) -> None:
        """Merge the waiting blocks and spill each one's local -> global id map."""
        if not self.waiting:
            return
        known = len(self.words)
        encoded = pc.dictionary_encode(pa.concat_arrays(
            [self.words, *(s.words.cast(pa.large_string()) for s in self.waiting)]))
        self.words = encoded.dictionary
        ids = encoded.indices.to_numpy(zero_copy_only=False)
        counts = np.zeros(len(self.words), dtype=np.int64)
        counts[:known] = self.counts
        start = known
        for scan in self.waiting:
            local_to_global = ids[start:start + len(scan.words)]
            start += len(scan.words)
            counts[local_to_global] += scan.counts  # distinct within a block
            _spill(local_to_global.astype(np.int32), _spill_paths(self.spill, scan.index)[2])
            scan.words = scan.counts = None  # merged: keep nothing per block but its sizes
        self.counts = counts
        self.waiting, self.waiting_words = [], 0


def build_vocab(words: WordCounts, settings: PrepareSettings) -> tuple[Vocab, np.ndarray]:
    """The vocabulary, and each distinct word's vocabulary id (0 = unknown)."""
    words.merge()
    counts = words.counts
    candidates = np.flatnonzero(counts >= settings.min_count)
    unk = pc.index(words.words, UNK).as_py()
    if unk >= 0:
        candidates = candidates[candidates != unk]
    # A stable sort of ids in first-occurrence order: ties keep that order.
    ranked = candidates[np.argsort(-counts[candidates], kind="stable")]
    if settings.max_vocab:
        ranked = ranked[: settings.max_vocab]
    if ranked.shape[0] == 0:
        raise UserError(f"no word occurs at least {settings.min_count} times in the input; "
                        "lower --min-count (data.min_count) or give a larger corpus")
    vocab_of_word = np.zeros(counts.shape[0], dtype=np.int32)
    vocab_of_word[ranked] = np.arange(1, ranked.shape[0] + 1, dtype=np.int32)
    vocab = Vocab([UNK, *words.words.take(ranked).to_pylist()],
                  np.concatenate([[0], counts[ranked]]).astype(np.int64))
    return vocab, vocab_of_word


# ------------------------------------------------------------------------- pass 2: encode


@dataclass
class EncodedBlock:
    tokens: np.ndarray  # int32 known ids
    piece_known: np.ndarray  # known tokens per sentence piece (zeros included), int64
    continues_open_piece: bool
    """The first piece continues the piece the previous block left open."""


def sentence_pieces(line_tokens: np.ndarray, lead: int, max_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Raw token ranges [start, end) in the block of each sentence piece: every line cut into
    pieces of at most ``max_len`` raw tokens. The first line already had ``lead`` raw tokens in
    earlier blocks, so its cuts fall at multiples of max_len counted from its real start."""
    lengths = line_tokens.astype(np.int64)
    starts = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if lead == 0 and (lengths.shape[0] == 0 or lengths.max() <= max_len):
        keep = lengths > 0
        return starts[:-1][keep], starts[1:][keep]
    offset = np.zeros_like(lengths)
    if offset.shape[0]:
        offset[0] = lead
    first = offset // max_len
    count = np.where(lengths > 0, (offset + lengths - 1) // max_len - first + 1, 0)
    line = np.repeat(np.arange(lengths.shape[0]), count)
    rank = np.arange(line.shape[0]) - np.repeat(np.cumsum(count) - count, count)
    k = first[line] + rank
    v_start = np.maximum(offset[line], k * max_len)
    v_end = np.minimum(offset[line] + lengths[line], (k + 1) * max_len)
    base = starts[line] - offset[line]
    return base + v_start, base + v_end


def encode_block(scan: BlockScan, lead: int, vocab_of_word: np.ndarray, spill: Path,
                 max_len: int) -> EncodedBlock:
    """Pass 2 for one block: vocabulary ids of known tokens and known tokens per piece."""
    ids_path, lines_path, map_path = _spill_paths(spill, scan.index)
    local = vocab_of_word[np.fromfile(map_path, dtype=np.int32)]
    ids = local[np.fromfile(ids_path, dtype=np.int32)]
    known = ids != 0
    known_before = np.zeros(ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(known, out=known_before[1:])
    line_tokens = np.fromfile(lines_path, dtype=np.int32)
    start, end = sentence_pieces(line_tokens, lead, max_len)
    for path in (ids_path, lines_path, map_path):
        path.unlink()
    continues = bool(lead and lead % max_len and line_tokens.shape[0] and line_tokens[0])
    return EncodedBlock(ids[known], known_before[end] - known_before[start], continues)


class PieceJoiner:
    """Joins pieces across blocks: a block that runs on holds its last piece back until the
    next block says whether the line goes on in that piece."""

    def __init__(self) -> None:
        self.open_tokens = np.zeros(0, dtype=np.int32)
        self.open_known: int | None = None

    def complete(self, block: EncodedBlock, runs_on: bool) -> tuple[np.ndarray, np.ndarray]:
        """The block's tokens and sentence lengths that are final now."""
        tokens, known = block.tokens, block.piece_known
        if self.open_known is not None and not (runs_on and known.shape[0] == 0
                                                and not block.continues_open_piece):
            tokens = np.concatenate([self.open_tokens, tokens])
            if block.continues_open_piece:
                known = known.copy()
                known[0] += self.open_known
            else:  # the open piece ended where the block began
                known = np.concatenate([[self.open_known], known])
            self.open_known = None
        if runs_on and known.shape[0]:
            own = int(known[-1])
            self.open_tokens = tokens[tokens.shape[0] - own:].copy()
            self.open_known = own
            tokens, known = tokens[: tokens.shape[0] - own], known[:-1]
        return tokens, known[known > 0]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """What the last block held back."""
        if not self.open_known:
            return self.open_tokens[:0], np.zeros(0, dtype=np.int64)
        return self.open_tokens, np.array([self.open_known], dtype=np.int64)


# ---------------------------------------------------------------------------- the job


class Progress:
    """A one-line progress display on stderr, only on a terminal."""

    def __init__(self, enabled: bool, total_bytes: int | None):
        self.enabled = enabled
        self.total = total_bytes
        self.start = time.perf_counter()
        self.last = 0.0

    def show(self, stage: str, done_bytes: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and not force):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        of = f" / {self.total / 1e6:,.0f}" if self.total else ""
        sys.stderr.write(f"\rprepare: {stage} {done_bytes / 1e6:,.0f}{of} MB, "
                         f"{tokens / 1e6:,.1f}M tokens, {rate / 1e6:.1f}M tokens/s   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _ordered(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]],
             ahead: int) -> Iterator[Any]:
    """Results of ``jobs`` in order, with at most ``ahead`` of them running or waiting."""
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _up_to_date(out: Path, inputs: list[dict[str, Any]], settings: PrepareSettings) -> bool:
    try:
        manifest = read_manifest(out)
        if manifest is None or manifest.get("inputs") != inputs:
            return False
        if manifest.get("settings") != settings.to_dict():
            return False
        load_prepared(out)  # every file still the size the manifest records
    except (UserError, OSError, KeyError, TypeError):
        return False
    return True


def _refuse_foreign(out: Path) -> None:
    """Refuse to write into a folder of someone else's files: ``--out`` must be new, empty,
    or a prepared corpus (a dist-w2v manifest, or a prepare's files that lost theirs)."""
    kind = manifest_kind(out)
    if kind == "ours":
        return
    if kind == "other":
        raise UserError(f"--out {out} holds a {MANIFEST_FILE} that is not dist-w2v's; give a "
                        "new or empty folder, or add --force to write there anyway")
    ours = {LOCK_FILE, *(p.name for p in work_files(out))}
    if looks_prepared(out):
        ours |= {*DATA_FILES, MANIFEST_FILE}
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in ours and not p.name.startswith(SPILL_PREFIX))
    if others:
        listed = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise UserError(f"--out {out} already holds files ({listed}) and is no prepared corpus "
                        f"(no {MANIFEST_FILE}); give a new or empty folder, or add --force to "
                        "write there anyway")


def _remove_leftovers(out: Path) -> None:
    """Spill folders and temporary files of prepares that were killed: whoever holds the lock
    on ``out`` is its only writer, so every one found is stale."""
    for stale in out.glob(SPILL_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    for path in work_files(out):
        path.unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    """``--out`` must be a folder or not there yet; said in one line, whatever is in the way."""
    try:
        info = os.stat(out)
    except FileNotFoundError:
        if out.is_symlink():
            raise UserError(f"--out {out} is a link to {os.readlink(out)}, which does not "
                            "exist; create that folder, or give another --out") from None
        return
    except NotADirectoryError:
        raise UserError(f"--out {out} lies under a file, not a folder; give another --out"
                        ) from None
    except OSError as exc:  # a folder on the way that cannot be entered, a name too long
        raise UserError(f"cannot use --out {out} ({exc.strerror}); give another --out, or fix "
                        "its folders' permissions") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"--out {out} is a file; give a folder")


def prepare(inputs: Sequence[str | Path], out: str | Path, settings: PrepareSettings,
            workers: int = 0, *, say: Callable[[str], None] = print,
            warn: Callable[[str], None] | None = None, progress: bool | None = None,
            block_bytes: int = BLOCK_BYTES, force: bool = False) -> PrepareOutcome:
    """Prepare ``inputs`` into the folder ``out``; nothing is done when ``out`` already holds
    them under the same settings (unless ``force``, which also lets ``out`` be a folder of
    other files). One prepare at a time writes into ``out``: a second is refused. A failed
    prepare leaves ``out`` as it found it (the empty folders it created are removed). ``say``
    gets the summary line, ``warn`` (default: stderr) a line about an input read as it may not
    be meant; ``progress``: None = when stderr is a terminal."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    warn = warn or _to_stderr
    _check_out(out)
    files = expand_inputs(inputs, out)
    inputs_seen = input_entries(files)
    created: list[Path] = []
    try:
        created = make_folders(out)
        # Checked once out exists: a path such as new/../folder names a folder that is there,
        # but reads as missing until new/ has been made.
        if not force and out not in created:
            _refuse_foreign(out)
        fd = open_lock(out / LOCK_FILE)
    except (OSError, UserError) as exc:
        unmake_folders(created)
        if isinstance(exc, UserError):
            raise
        if not force and _up_to_date(out, inputs_seen, settings):  # e.g. a read-only corpus
            return _nothing_to_do(out, say, start)
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    with holding(fd, lambda holder: UserError(
            f"--out {out} is being written by {holder} (another dist-w2v prepare); wait for it "
            "to end, or choose another --out")):
        try:  # under the lock: what is removed below is ours alone
            _remove_leftovers(out)
            if not force and _up_to_date(out, inputs_seen, settings):
                return _nothing_to_do(out, say, start)
            return _prepare_locked(files, inputs_seen, out, settings, workers, say, warn,
                                   progress, block_bytes)
        except BaseException:
            _remove_leftovers(out)
            unmake_folders(created, out / LOCK_FILE)
            raise


def _to_stderr(line: str) -> None:
    print(f"dist-w2v: {line}", file=sys.stderr)


def _nothing_to_do(out: Path, say: Callable[[str], None], start: float) -> PrepareOutcome:
    say(f"{out} is up to date (same inputs and settings); nothing to do")
    return PrepareOutcome(out, read_manifest(out) or {}, True, time.perf_counter() - start)


def _prepare_locked(files: list[Path], inputs_seen: list[dict[str, Any]], out: Path,
                    settings: PrepareSettings, workers: int, say: Callable[[str], None],
                    warn: Callable[[str], None], progress: bool | None,
                    block_bytes: int) -> PrepareOutcome:
    start, start_cpu = time.perf_counter(), time.process_time()
    workers = workers or usable_cores()
    compressed = any(p.suffix.lower() in OPENERS for p in files)
    meter = Progress(sys.stderr.isatty() if progress is None else progress,
                     None if compressed else sum(e["bytes"] for e in inputs_seen))
    try:
        spill = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=out))
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare") as pool:
            scans, words = _count(files, settings, spill, pool, workers, block_bytes, meter,
                                  warn)
            raw_tokens = sum(s.num_tokens for s in scans)
            if raw_tokens == 0:
                names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
                raise UserError(f"the input ({names}) is empty: no words; give whitespace-"
                                "tokenized text, one sentence per line")
            vocab, vocab_of_word = build_vocab(words, settings)
            distinct = len(words.words)
            del words
            manifest = _encode(out, scans, vocab, vocab_of_word, spill, pool, workers, settings,
                               meter, inputs_seen,
                               {"raw_tokens": raw_tokens, "lines": sum(s.num_lines
                                                                      for s in scans),
                                "distinct_words": distinct})
    except OSError as exc:  # inputs were read already: this is --out (full disk, quota)
        raise UserError(f"writing the prepared corpus into {out} failed: "
                        f"{exc.strerror or exc}") from None
    finally:
        meter.done()
        shutil.rmtree(spill, ignore_errors=True)
    seconds = time.perf_counter() - start
    counts = manifest["counts"]
    say(f"prepared {out}: {counts['tokens']:,} tokens ({counts['raw_tokens']:,} read, "
        f"{counts['unknown_tokens']:,} unknown dropped), {counts['sentences']:,} sentences, "
        f"vocabulary {counts['vocab_size']:,}, {seconds:.1f} s "
        f"({time.process_time() - start_cpu:.1f} s CPU), "
        f"{counts['raw_tokens'] / max(seconds, 1e-9) / 1e6:.1f}M tokens/s")
    return PrepareOutcome(out, manifest, False, seconds)


def _count(files: Sequence[Path], settings: PrepareSettings, spill: Path,
           pool: ThreadPoolExecutor, workers: int, block_bytes: int, meter: Progress,
           notice: Callable[[str], None]) -> tuple[list[BlockScan], WordCounts]:
    """Pass 1: scan blocks in worker threads, merge their words here, in block order."""
    words = WordCounts(spill)
    scans: list[BlockScan] = []
    done_bytes = tokens = 0
    blocks = read_blocks(files, notice, block_bytes, settings.max_sentences)
    jobs = ((lambda b=b: scan_block(b, spill)) for b in blocks)
    for scan in _ordered(pool, jobs, workers + 1):
        words.add(scan)
        scans.append(scan)
        done_bytes += scan.num_bytes
        tokens += scan.num_tokens
        meter.show("counting", done_bytes, tokens)
    return scans, words


def _encode(out: Path, scans: list[BlockScan], vocab: Vocab, vocab_of_word: np.ndarray,
            spill: Path, pool: ThreadPoolExecutor, workers: int, settings: PrepareSettings,
            meter: Progress, inputs: list[dict[str, Any]], counts: dict[str, int]
            ) -> dict[str, Any]:
    """Pass 2: remap every block to vocabulary ids and write the prepared corpus."""
    leads, lead = [], 0
    for scan in scans:  # raw tokens of the line each block starts inside
        leads.append(lead)
        if scan.runs_on:  # its last line goes on; it began earlier if it is the only one
            lead = (lead if scan.num_lines == 1 else 0) + scan.last_line_tokens
        else:
            lead = 0
    max_len = settings.max_sentence_length
    jobs = ((lambda s=s, ld=ld: encode_block(s, ld, vocab_of_word, spill, max_len))
            for s, ld in zip(scans, leads, strict=True))
    writer = PreparedWriter(out)
    try:
        joiner = PieceJoiner()
        done_bytes = tokens = 0
        for scan, block in zip(scans, _ordered(pool, jobs, workers + 1), strict=True):
            writer.add(*joiner.complete(block, scan.runs_on))
            done_bytes += scan.num_bytes
            tokens += scan.num_tokens
            meter.show("writing", done_bytes, tokens)
        writer.add(*joiner.finish())
        counts = {**counts, "unknown_tokens": counts["raw_tokens"] - writer.num_tokens}
        return writer.commit(vocab, inputs, settings, counts)
    except BaseException:
        writer.abort()
        raise
