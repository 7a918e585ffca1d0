"""Checkpoints: what they hold, how they are written safely, and how the newest valid one is found.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is a ``torch.save``
of the training state. The digest makes a truncated or bit-flipped file detectable before
anything is unpickled. The digest is not a signature (anyone can compute it), so it proves nothing
about where a file came from: the payload holds only tensors and plain containers (dict, list,
tuple, str, int, float, bool, None), is checked to do so when it is written, and is read with
``torch.load(weights_only=True)``, whose unpickler refuses every other class or function. A
crafted file therefore cannot run code; it is refused with one line naming it. (safetensors would
need a second file or a JSON sidecar for the optimizer state and history, and a new dependency,
for the same guarantee.) Files are written by rank 0 to a temporary name in the same directory,
flushed, fsynced and renamed into place, so the newest complete checkpoint is never replaced by
a partial one; the other ranks learn the outcome through a collective, not a sleep.

The random stream needs no saved state: an epoch's examples and its shuffle are pure functions
of (seed, epoch), so (epoch, step) is the whole sampler position.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dist_w2v.atomic import TMP_SUFFIX, write_with
from dist_w2v.config import CkptConfig
from dist_w2v.errors import UserError
from dist_w2v.parallel.env import DistEnv, any_rank

# Unchanged since the first format: those files already held only tensors and plain containers,
# so they load under weights_only=True as they are.
MAGIC = b"DISTW2V-CKPT-1\n"
DIGEST_BYTES = 32
NAME = re.compile(r"^step-(\d{9,})\.pt$")


class CorruptCheckpoint(UserError):
    """A checkpoint file that is truncated, altered or not ours."""


class UnsafeCheckpoint(CorruptCheckpoint):
    """A checkpoint whose digest is right but whose pickle asks for code: made on purpose, not
    damaged by accident, so ``--resume auto`` stops on it rather than skipping to an older one."""


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    match = NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint")
    return int(match.group(1))


# Exact types: subclasses (numpy's float64 is a float, a namedtuple a tuple) pickle as their own
# class, which weights_only loading refuses, so a save must refuse them first.
PLAIN_SCALARS = (str, int, float, bool, type(None))
PLAIN_MAPPINGS = (dict, collections.OrderedDict)


def check_plain(value: Any, where: str = "payload") -> None:
    """Raise TypeError unless ``value`` is tensors and primitives in dicts, lists and tuples:
    all that a checkpoint may hold, and all that ``weights_only=True`` loading will accept."""
    if type(value) in PLAIN_MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}")
            check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    elif type(value) not in PLAIN_SCALARS and not isinstance(value, torch.Tensor):
        raise TypeError(f"checkpoint {where} is a {type(value).__name__}; a checkpoint holds "
                        "only tensors and plain containers")


def make_payload(model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                 train_state: dict[str, Any], vocab: dict[str, list], config: dict[str, Any],
                 corpus: str) -> dict[str, Any]:
    """What a checkpoint holds, in one place: the unwrapped model's tensors (moved to the CPU),
    the optimizer's state_dict, the loop's position and history (a plain dict, e.g.
    ``dataclasses.asdict(TrainState)``: (epoch, step) is the stream position), the vocabulary's
    and config's ``to_dict()``, and the fingerprint of the prepared corpus the stream reads."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": optimizer_state,
        "state": train_state,
        "vocab": vocab,
        "config": config,
        "corpus": corpus,
    }
    check_plain(payload)
    return payload


def write_checkpoint(handle: BinaryIO, payload: dict[str, Any]) -> None:
    """``MAGIC + sha256(body) + body``, the body a ``torch.save`` of the payload. The body is
    serialised once and written from that buffer (no copies: tables can be gigabytes)."""
    check_plain(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    handle.write(MAGIC)
    handle.write(hashlib.sha256(body).digest())
    handle.write(body)


UNSAFE = re.compile(r"(?:GLOBAL|global:?) ([\w.]+)")


def unsafe_reason(exc: Exception) -> str:
    """The class or function a refused pickle asked for, from torch's long message."""
    match = UNSAFE.search(str(exc))
    return f"it asks for {match.group(1)}" if match else "it holds objects that are not tensors"


def checkpoint_file(path: Path, if_folder: str, if_missing: str) -> Path:
    """``path`` when it is a file; else a one-line error ending in the caller's advice."""
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; {if_folder}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; {if_missing}")
    return path


def read_checkpoint(path: Path, fix: str | None = None) -> dict[str, Any]:
    """Load and verify one checkpoint file; a one-line CorruptCheckpoint when it is bad, ending
    in ``fix`` (what the caller's user can do instead) when given.

    Nothing in the file is ever executed: the payload is read with ``weights_only=True``.
    """
    try:
        return verified_payload(path)
    except UnsafeCheckpoint:
        raise  # its message already says what to do
    except CorruptCheckpoint as exc:
        if fix is None:
            raise
        raise CorruptCheckpoint(f"{exc}; {fix}") from None


def verified_payload(path: Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    header = len(MAGIC) + DIGEST_BYTES
    if len(raw) < header or not raw.startswith(MAGIC):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated (bad header)")
    digest, body = raw[len(MAGIC):header], raw[header:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated (checksum mismatch)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"checkpoint {path} was refused: {unsafe_reason(exc)}, and dist-w2v loads only "
            "tensors and plain containers (no code runs on load); if it came from a trusted "
            "older tool, load it yourself and torch.save its tensors and plain values again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptCheckpoint(
            f"checkpoint {path} cannot be loaded ({exc.__class__.__name__})"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "state" not in payload:
        raise CorruptCheckpoint(f"checkpoint {path} is not a dist-w2v checkpoint")
    return payload


@dataclass
class Found:
    path: Path
    payload: dict[str, Any]


class Checkpointer:
    """Owns the policy: when to save, file names, how many to keep, which one to resume."""

    def __init__(self, directory: Path, cfg: CkptConfig, env: DistEnv,
                 say: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.cfg = cfg
        self.env = env
        self.say = say

    def due(self, global_step: int) -> bool:
        return self.cfg.every_steps > 0 and global_step % self.cfg.every_steps == 0

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest step first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if NAME.match(p.name)]
        return sorted(found, key=checkpoint_step, reverse=True)

    def save(self, payload: dict[str, Any], global_step: int) -> Path:
        """Rank 0 writes; every rank returns only once the file is in place (or raises)."""
        path = self.directory / checkpoint_name(global_step)
        error: str | None = None
        if self.env.is_main:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                write_with(path, lambda handle: write_checkpoint(handle, payload))
            except OSError as exc:
                previous = next((p for p in self.checkpoints() if p != path), None)
                kept = f"; {previous} is intact" if previous else ""
                error = (f"could not write checkpoint {path} ({exc.strerror or exc}){kept}; free "
                         "disk space or make the run directory writable, then rerun with "
                         "--resume auto")
            else:
                self._prune()
        if any_rank(self.env, error is not None):
            raise UserError(error or "checkpoint write failed on rank 0; see its log")
        return path

    def _prune(self) -> None:
        """Drop all but the newest ``keep`` checkpoints, and temp files of interrupted saves."""
        stale = list(self.directory.glob(f"step-*.pt{TMP_SUFFIX}"))
        for old in self.checkpoints()[self.cfg.keep:] + stale:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                self.say(f"could not remove old checkpoint file {old} ({exc.strerror})")

    def set_aside_newer(self, global_step: int) -> None:
        """Rank 0, after a resume: rename checkpoints newer than the resumed one.

        They belong to an abandoned future (an explicit ``--resume`` of an older file) or are
        corrupt; left in place, a later restart's ``--resume auto`` would jump to them and
        keep-N pruning would delete the new checkpoints first.
        """
        if not self.env.is_main:
            return
        for path in self.checkpoints():
            if checkpoint_step(path) > global_step:
                aside = path.with_name(path.name + ".superseded")
                try:
                    os.replace(path, aside)
                except OSError as exc:  # the next save reports an unwritable directory
                    self.say(f"could not set aside {path} ({exc.strerror})")
                else:
                    self.say(f"set aside {path.name} (newer than the resumed checkpoint) "
                             f"as {aside.name}")

    def load_latest_valid(self) -> Found | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped.

        None when there are no checkpoints; an error when there are some but none verifies,
        since starting fresh then would silently throw the run away.
        """
        candidates = self.checkpoints()
        for number, path in enumerate(candidates, start=1):
            try:
                return Found(path, read_checkpoint(path))
            except UnsafeCheckpoint:
                raise
            except CorruptCheckpoint as exc:
                older = "; trying the previous checkpoint" if number < len(candidates) else ""
                self.say(f"skipping {exc}{older}")
        if candidates:
            raise UserError(
                f"no valid checkpoint in {self.directory} ({len(candidates)} found, none "
                "readable); pass --resume FILE, or move them away to start fresh"
            )
        return None

    def resolve(self, resume: str | None) -> Found | None:
        """``--resume``: None (start fresh), "auto" (newest valid, if any) or a file path."""
        if resume is None:
            return None
        if resume == "auto":
            return self.load_latest_valid()
        path = checkpoint_file(
            Path(resume), if_folder="pass a checkpoint file, or --resume auto with that run's "
            "--run-dir", if_missing="pass an existing file or --resume auto")
        return Found(path, read_checkpoint(
            path, fix="resume an older checkpoint, or --resume auto, which skips damaged files"))
