"""Corpus files and the vocabulary: where PTB lives, reading a corpus, counting words.

Semantics follow d2l 14.3 (see DESIGN.md): tokens with count >= min_count sorted by descending
count (ties by first occurrence), ``<unk>`` at index 0, unknown tokens dropped from sentences.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_w2v.config import DataConfig
from dist_w2v.errors import UserError

UNK = "<unk>"
PTB_URL = "http://d2l-data.s3-accelerate.amazonaws.com/ptb.zip"
PTB_SHA1 = {
    "ptb.train.txt": "f9ffb014fa33bd5730e5029697ad245184f3a678",
    "ptb.valid.txt": "d9f5fed6afa5e1b82cd1e3e5f5040f6852940228",
    "ptb.test.txt": "5c15c548b42d80bce9332b788514e6635fb0226e",
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dist-w2v" / "ptb"


def resolve_data_dir(cfg: DataConfig, env: dict[str, str] | None = None) -> Path:
    """data.dir, else $DIST_W2V_DATA, else the per-user cache directory."""
    env = os.environ if env is None else env
    if cfg.dir:
        return Path(cfg.dir).expanduser()
    if env.get("DIST_W2V_DATA"):
        return Path(env["DIST_W2V_DATA"]).expanduser()
    return default_cache_dir()


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def download_ptb(data_dir: Path, url: str = PTB_URL) -> None:
    """Fetch d2l's ptb.zip into ``data_dir`` and verify every file by SHA-1."""
    hint = (
        f"could not download PTB from {url} into {data_dir}; put ptb.train.txt (and ptb.valid.txt) "
        "there yourself, or point data.dir / $DIST_W2V_DATA at a folder that has them"
    )
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{hint} ({exc.__class__.__name__}: {exc})") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, expected in PTB_SHA1.items():
        member = next((m for m in archive.namelist() if m.endswith("/" + name) or m == name), None)
        if member is None:
            raise UserError(f"{hint} (the archive has no {name})")
        target = data_dir / name
        tmp = target.with_suffix(".part")
        tmp.write_bytes(archive.read(member))
        if _sha1(tmp) != expected:
            tmp.unlink()
            raise UserError(f"{hint} ({name} failed its SHA-1 check)")
        os.replace(tmp, target)


def corpus_path(cfg: DataConfig, split: str = "train") -> Path:
    """The text file to read: data.corpus when set (train split only), else PTB's split file."""
    if cfg.corpus and split == "train":
        path = Path(cfg.corpus).expanduser()
        if not path.is_file():
            raise UserError(
                f"corpus file {path} not found; fix data.corpus or leave it unset for PTB"
            )
        return path
    data_dir = resolve_data_dir(cfg)
    path = data_dir / f"ptb.{split}.txt"
    if not path.is_file():
        if cfg.dir or cfg.corpus:
            raise UserError(
                f"PTB file {path} not found; put ptb.{split}.txt in {data_dir} or fix data.dir"
            )
        download_ptb(data_dir)
    return path


def read_sentences(path: Path, max_sentences: int = 0) -> list[list[str]]:
    """Whitespace-tokenized sentences, one per line; blank lines are kept as empty sentences."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"corpus file {path} is not UTF-8 text; convert it to UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if max_sentences:
        lines = lines[:max_sentences]
    sentences = [line.split() for line in lines]
    if not any(sentences):
        raise UserError(f"corpus file {path} is empty; give a text file with one sentence per line")
    return sentences


@dataclass
class Vocab:
    """Index <-> token, and each token's count in the unk-free corpus (index 0 is <unk>)."""

    idx_to_token: list[str]
    counts: np.ndarray

    def __post_init__(self) -> None:
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
        return cls(list(raw["idx_to_token"]), np.asarray(raw["counts"], dtype=np.int64))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"vocabulary file {path} is missing or corrupt") from None


def build_vocab(sentences: list[list[str]], min_count: int) -> Vocab:
    counter = collections.Counter(token for sentence in sentences for token in sentence)
    # Counter iterates in first-occurrence order and sorted() is stable: ties keep d2l's order.
    ranked = sorted(counter.items(), key=lambda item: item[1], reverse=True)
    idx_to_token = [UNK] + [t for t, c in ranked if c >= min_count and t != UNK]
    if len(idx_to_token) < 2:
        raise UserError(
            f"no word occurs at least {min_count} times in the corpus; lower data.min_count "
            "or use a larger corpus"
        )
    counts = np.zeros(len(idx_to_token), dtype=np.int64)
    counts[1:] = [counter[t] for t in idx_to_token[1:]]
    return Vocab(idx_to_token, counts)


@dataclass
class EncodedCorpus:
    """The unk-free corpus as flat token ids plus each token's sentence number."""

    tokens: np.ndarray
    sentence_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def encode(sentences: list[list[str]], vocab: Vocab) -> EncodedCorpus:
    lookup = vocab.token_to_idx
    ids = [[lookup.get(t, 0) for t in s] for s in sentences]
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for s in ids for i in s), dtype=np.int64, count=int(lengths.sum()))
    sentence_ids = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    known = flat != 0
    return EncodedCorpus(tokens=flat[known], sentence_ids=sentence_ids[known])


def load_corpus(cfg: DataConfig, vocab: Vocab | None = None) -> tuple[EncodedCorpus, Vocab]:
    """Read the training corpus, build (or reuse) the vocabulary, and encode it."""
    sentences = read_sentences(corpus_path(cfg), cfg.max_sentences)
    vocab = vocab if vocab is not None else build_vocab(sentences, cfg.min_count)
    corpus = encode(sentences, vocab)
    if corpus.num_tokens < 2:
        raise UserError("the corpus has fewer than 2 known words; use a larger corpus")
    return corpus, vocab
