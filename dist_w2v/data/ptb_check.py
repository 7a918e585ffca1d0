"""Checking a PTB file that is already on disk against its published SHA-1, once.

Hashing ptb.train.txt (5 MB) on every run would be cheap but pointless; a file that passed is
remembered by (size, mtime) in a small JSON beside it (``.ptb-sha1-ok.json``), so it is hashed
again only when it changes. Where that folder is read-only (a shared data copy), the check simply
runs each time. Files whose names PTB does not have are not checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from dist_w2v.errors import UserError

PTB_SHA1 = {
    "ptb.train.txt": "f9ffb014fa33bd5730e5029697ad245184f3a678",
    "ptb.valid.txt": "d9f5fed6afa5e1b82cd1e3e5f5040f6852940228",
    "ptb.test.txt": "5c15c548b42d80bce9332b788514e6635fb0226e",
}
CACHE_FILE = ".ptb-sha1-ok.json"


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache: Path) -> dict[str, list[int]]:
    try:
        raw = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def verify_ptb_file(path: Path) -> None:
    """Raise a one-line UserError when ``path`` (ptb.{train,valid,test}.txt) is not the
    published file; a file that passed before and has not changed since is not hashed again."""
    path = Path(path)
    expected = PTB_SHA1.get(path.name)
    if expected is None:
        return
    try:
        stamp = _stamp(path)
    except OSError as exc:
        raise UserError(f"PTB file {path} cannot be read ({exc.strerror})") from None
    cache_path = path.parent / CACHE_FILE
    cache = _read_cache(cache_path)
    if cache.get(path.name) == stamp:
        return
    try:
        actual = file_sha1(path)
    except OSError as exc:
        raise UserError(f"PTB file {path} cannot be read ({exc.strerror})") from None
    if actual != expected:
        raise UserError(
            f"PTB file {path} is not the published file (SHA-1 {actual}, expected {expected}); "
            "delete it to download it again, or train on it with data.corpus=PATH"
        )
    cache[path.name] = stamp
    tmp = cache_path.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # a read-only data folder: check again next time
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_path)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
