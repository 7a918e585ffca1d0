"""Where training data comes from: PTB (found or downloaded, SHA-1 checked), a text file, or a
prepared folder; and the per-user cache of prepared corpora that training reads.

:func:`prepared_dir_for` turns a :class:`DataConfig` into a prepared corpus folder:
``data.prepared`` as it is, else ``data.corpus`` or PTB's ptb.train.txt prepared once into
``CACHE/prepared/KEY``, KEY a hash of the input's content (SHA-256) and the settings. The
prepare runs in a temporary sibling folder that is renamed into place, so preparers started at
once (one per node) never see a half-written folder, and the one that loses the rename uses
the winner's. Checksums of big files are remembered by (path, size, mtime) in
``CACHE/checksums.json``, so a file is hashed once, not on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dist_w2v.data.prepared import VERSION, PrepareSettings, file_digest, load_prepared
from dist_w2v.errors import UserError

if TYPE_CHECKING:  # env.py imports torch, which `dist-w2v prepare` does not need
    from dist_w2v.config import DataConfig
    from dist_w2v.parallel.env import UserDirs

PTB_URL = "http://d2l-data.s3-accelerate.amazonaws.com/ptb.zip"
PTB_SHA1 = {
    "ptb.train.txt": "f9ffb014fa33bd5730e5029697ad245184f3a678",
    "ptb.valid.txt": "d9f5fed6afa5e1b82cd1e3e5f5040f6852940228",
    "ptb.test.txt": "5c15c548b42d80bce9332b788514e6635fb0226e",
}
CHECKSUMS_FILE = "checksums.json"
PREPARED_DIR = "prepared"
WORK_MARK = ".tmp-"
"""A cache prepare's work folder is ``.KEY.tmp-PID@HOST-XXXXXXXX``, renamed to KEY when done."""
HOST = socket.gethostname()


# ----------------------------------------------------------------------------- checksums


def unreadable(path: Path, exc: OSError) -> UserError:
    return UserError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions, or "
                     "point the config at a file this process can read")


def file_checksum(path: Path, algorithm: str, cache: Path) -> str:
    """The file's digest, remembered in ``cache/checksums.json`` by (path, size, mtime_ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{algorithm}:{path}"
    store = cache / CHECKSUMS_FILE
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if (isinstance(entry, dict) and entry.get("bytes") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns):
        return str(entry["digest"])
    try:
        digest = file_digest(path, algorithm)
    except OSError as exc:
        raise unreadable(path, exc) from None
    known[key] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": digest}
    with contextlib.suppress(OSError):  # an unwritable cache only costs a hash next time
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checksums-", dir=cache)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(known, handle, indent=0)
        os.replace(tmp, store)
    return digest


# ----------------------------------------------------------------------------------- PTB


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
        if hashlib.sha1(tmp.read_bytes()).hexdigest() != expected:
            tmp.unlink()
            raise UserError(f"{hint} ({name} failed its SHA-1 check)")
        os.replace(tmp, target)


def ptb_dir(cfg: DataConfig, dirs: UserDirs) -> Path:
    """data.dir, else $DIST_W2V_DATA, else the per-user cache (where PTB is downloaded)."""
    if cfg.dir:
        return Path(cfg.dir).expanduser()
    if dirs.ptb is not None:
        return dirs.ptb
    return dirs.cache / "ptb"


def ptb_split_path(cfg: DataConfig, dirs: UserDirs, split: str = "train") -> Path:
    """PTB's ``ptb.{split}.txt``, downloaded when missing (unless data.dir or data.corpus names
    the data) and checked against its SHA-1 once per (size, mtime)."""
    if split not in ("train", "valid", "test"):
        raise UserError(f"PTB has no split {split!r}; use train, valid or test")
    data_dir = ptb_dir(cfg, dirs)
    name = f"ptb.{split}.txt"
    path = data_dir / name
    if not path.is_file():
        if cfg.dir or cfg.corpus:
            raise UserError(f"PTB file {path} not found; put {name} in {data_dir} or fix "
                            "data.dir")
        download_ptb(data_dir)
    if file_checksum(path, "sha1", dirs.cache) != PTB_SHA1[name]:
        raise UserError(f"PTB file {path} fails its SHA-1 check (expected {PTB_SHA1[name]}); "
                        "delete it to download it again, or fix data.dir")
    return path


def corpus_path(cfg: DataConfig, dirs: UserDirs) -> Path:
    """The training text: data.corpus when set, else PTB's ptb.train.txt."""
    if cfg.corpus:
        path = Path(cfg.corpus).expanduser()
        if path.is_dir():
            raise UserError(f"data.corpus {path} is a folder; give one text file, or run "
                            f"`dist-w2v prepare {path} --out DIR` and train with "
                            "data.prepared=DIR")
        if not path.is_file():
            raise UserError(f"corpus file {path} not found; fix data.corpus or leave it unset "
                            "for PTB")
        return path
    return ptb_split_path(cfg, dirs, "train")


# ------------------------------------------------------------------------- prepared cache


def check_data(cfg: DataConfig, dirs: UserDirs) -> None:
    """The one check that the training data is there without preparing it: a prepared folder
    that loads, or the text file to prepare (PTB is fetched into its cache when missing, as
    training would). Raises a one-line UserError."""
    if cfg.prepared:
        load_prepared(cfg.prepared)
        return
    path = corpus_path(cfg, dirs)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise unreadable(path, exc) from None


def settings_for(cfg: DataConfig) -> PrepareSettings:
    return PrepareSettings(min_count=cfg.min_count, max_vocab=cfg.max_vocab,
                           max_sentence_length=cfg.max_sentence_length,
                           max_sentences=cfg.max_sentences)


def cache_key(content_sha256: str, settings: PrepareSettings) -> str:
    """The cache folder name: the input's content and the settings, not its path."""
    payload = json.dumps({"input_sha256": content_sha256, "settings": settings.to_dict(),
                          "format_version": VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepared_dir_for(cfg: DataConfig, dirs: UserDirs,
                     say: Callable[[str], None] = print) -> Path:
    """The prepared corpus to train on: data.prepared (checked), else data.corpus or PTB
    prepared once into the cache."""
    if cfg.prepared:
        path = Path(cfg.prepared).expanduser()
        load_prepared(path)
        return path
    source = corpus_path(cfg, dirs)
    settings = settings_for(cfg)
    key = cache_key(file_checksum(source, "sha256", dirs.cache), settings)
    root = dirs.cache / PREPARED_DIR
    target = root / key
    if _usable(target):
        return target
    _remove_broken(target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        work = Path(tempfile.mkdtemp(prefix=f".{key}{WORK_MARK}{os.getpid()}@{HOST}-",
                                     dir=root))
    except OSError as exc:
        raise UserError(f"cannot write prepared corpora to {root}: {exc.strerror or exc}; "
                        "set $XDG_CACHE_HOME to a writable folder, or prepare the corpus "
                        "with `dist-w2v prepare` and set data.prepared") from None
    from dist_w2v.data.prepare import prepare

    say(f"preparing {source} into {target} (once; later runs reuse it)")
    try:
        prepare([source], work, settings, say=lambda line: say(named_as(line, work, target)))
        try:
            os.rename(work, target)
        except OSError:
            if not _usable(target):  # a concurrent preparer won the rename: use theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_prepared(target)
    return target


def named_as(line: str, work: Path, target: Path) -> str:
    """prepare's summary names the folder it wrote: a temporary one, renamed to the target."""
    return line.replace(str(work), str(target))


def _usable(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    try:
        load_prepared(directory)
    except UserError:
        return False
    return True


def _remove_abandoned(root: Path) -> None:
    """Work folders of cache prepares that were killed (SIGKILL, OOM) on this host. A folder
    names its preparer's PID and host: the cache may be shared by nodes, and only this host can
    tell whether one of its PIDs still runs."""
    for work in root.glob(f".*{WORK_MARK}*@{HOST}-*"):
        pid = work.name.partition(WORK_MARK)[2].partition("@")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_broken(directory: Path) -> None:
    """A cache folder that exists but does not load (manifest lost, files changed): move it
    aside first, so that no preparer ever sees it half removed."""
    if not directory.exists():
        return
    trash = directory.with_name(f".{directory.name}.broken-{os.getpid()}")
    try:
        os.rename(directory, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)

