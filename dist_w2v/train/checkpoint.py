"""Checkpoints: what they hold, how they are written safely, and how the newest valid one is found.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is a ``torch.save``
of the training state. The digest makes a truncated or bit-flipped file detectable before
anything is unpickled. The digest is not a signature (anyone can compute it), so it proves nothing
about where a file came from: the payload holds only tensors and plain containers (dict, list,
tuple, str, int, float, bool, None), is checked to do so when it is written, and is read with
``torch.load(weights_only=True)``, whose unpickler refuses every other class or function. A
crafted file therefore cannot run code; it is refused with one line naming it. (safetensors would
need a second file or a JSON sidecar for the optimizer state and history, and a new dependency,
for the same guarantee.) What is loaded is then checked against the layout :func:`make_payload`
writes (its parts, their types, shapes that agree with each other, finite tables), so that no
reader meets a malformed payload as a traceback. Files are written by rank 0 to a temporary name
in the same directory, flushed, fsynced and renamed into place, so the newest complete checkpoint
is never replaced by a partial one; the other ranks learn the outcome through a collective, not a
sleep.

The random stream needs no saved state: an epoch's examples and its shuffle are pure functions
of (seed, epoch), so (epoch, step) is the whole sampler position.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
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
from dist_w2v.data.vocab import dict_problem as vocab_dict_problem
from dist_w2v.errors import UserError
from dist_w2v.parallel.env import DistEnv, any_rank

# Unchanged since the first format: those files already held only tensors and plain containers,
# so they load under weights_only=True as they are.
MAGIC = b"DISTW2V-CKPT-1\n"
DIGEST_BYTES = 32
NAME = re.compile(r"^step-(\d{9,})\.pt$")


class CorruptCheckpoint(UserError):
    """A checkpoint file that is truncated, altered or not ours."""


class RefusedCheckpoint(CorruptCheckpoint):
    """A checkpoint whose digest is right but whose content is not what dist-w2v writes: made so
    on purpose or by another tool, not damaged by accident, so ``--resume auto`` stops on it
    rather than skipping to an older one, and its message says what to do."""


class UnsafeCheckpoint(RefusedCheckpoint):
    """A pickle that asks for code."""


class MalformedCheckpoint(RefusedCheckpoint):
    """Tensors and plain values, but not laid out as :func:`make_payload` lays them out."""


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


PAYLOAD_KEYS = ("model", "optimizer", "state", "vocab", "config", "corpus")
# Checkpoints written before the corpus fingerprint existed lack it; resume then skips that check.
OPTIONAL_KEYS = ("corpus",)
TABLES = ("center.weight", "context.weight")
# The loop's TrainState, field by field (tests/test_checkpoint.py holds the two together): a
# field more or less would make TrainState(**state) fail, or resume at a position never saved.
STATE_FIELDS = {
    "epoch": int, "step": int, "global_step": int, "loss_sum_total": float,
    "examples_total": int, "epoch_loss_sum": float, "epoch_examples": int,
    "epoch_seconds": float, "history": list,
}


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
    except RefusedCheckpoint:
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
    try:
        check_payload(payload)
    except Malformed as exc:
        # Checked once here, where every loader reads: resume, similar, eval and export then
        # index the payload freely.
        raise MalformedCheckpoint(
            f"checkpoint {path} is not a valid dist-w2v checkpoint ({exc}); its checksum is "
            "right, so it was written like this, not damaged: use another checkpoint (--resume "
            f"auto stops at this one: move it out of {Path(path).parent} to resume the one "
            "before)"
        ) from None
    return payload


class Malformed(Exception):
    """What is wrong with a payload's layout, in a few words."""


def require(ok: bool, problem: str) -> None:
    if not ok:
        raise Malformed(problem)


def is_number(value: Any, kind: type = float) -> bool:
    """An int (for ``kind=float`` also a finite float); never a bool."""
    if type(value) is int:
        return True
    return kind is float and type(value) is float and math.isfinite(value)


def check_payload(payload: Any) -> None:
    """Raise Malformed unless ``payload`` has every part :func:`make_payload` writes, of its
    type, with tables, vocabulary, config and optimizer state of one consistent size."""
    require(type(payload) in PLAIN_MAPPINGS, f"the payload is a {type(payload).__name__}, not a "
            "dict")
    missing = [k for k in PAYLOAD_KEYS if k not in payload and k not in OPTIONAL_KEYS]
    require(not missing, f"no {', '.join(missing)}")
    extra = sorted(str(k) for k in payload if k not in PAYLOAD_KEYS)
    require(not extra, f"unknown part {', '.join(extra)}")
    rows, dim = check_tables(payload["model"])
    check_vocab(payload["vocab"], rows)
    check_config(payload["config"], dim)
    check_state(payload["state"])
    check_optimizer(payload["optimizer"], rows, dim)
    require(type(payload.get("corpus", "")) is str, "corpus is not a string")


def check_tables(model: Any) -> tuple[int, int]:
    """The tables' common (rows, dim)."""
    require(type(model) in PLAIN_MAPPINGS and sorted(model) == sorted(TABLES),
            f"model must hold exactly {' and '.join(TABLES)}")
    shapes = set()
    for name in TABLES:
        table = model[name]
        require(isinstance(table, torch.Tensor) and table.layout == torch.strided
                and table.dtype == torch.float32 and table.dim() == 2,
                f"{name} is not a 2-D float32 tensor")
        shapes.add(tuple(table.shape))
    require(len(shapes) == 1, f"the tables differ in shape ({' and '.join(map(str, shapes))})")
    for name in TABLES:
        bad = int(model[name].numel() - torch.isfinite(model[name]).sum())
        require(bad == 0, f"{name} holds {bad} of {model[name].numel()} values that are NaN or "
                "infinite")
    rows, dim = shapes.pop()
    require(rows >= 1 and dim >= 1, f"the tables are empty ({rows} x {dim})")
    return rows, dim


def check_vocab(vocab: Any, rows: int) -> None:
    problem = vocab_dict_problem(dict(vocab) if type(vocab) in PLAIN_MAPPINGS else vocab)
    require(problem is None, problem or "")
    words = len(vocab["idx_to_token"])
    require(words == rows, f"the tables have {rows} rows but the vocabulary {words} words")


def check_config(config: Any, dim: int) -> None:
    """Sections as mappings (resume compares their values) and model.dim the tables' width.
    Field names are not checked, so a checkpoint of an older version with a since-removed
    setting still loads."""
    require(type(config) in PLAIN_MAPPINGS, "config is not a mapping")
    bad = [str(name) for name, body in config.items() if type(body) not in PLAIN_MAPPINGS]
    require(not bad, f"config section {', '.join(bad)} is not a mapping")
    saved = config.get("model", {}).get("dim")
    require(saved == dim and is_number(saved, int),
            f"config model.dim is {saved!r} but the tables are {dim} wide")


def check_state(state: Any) -> None:
    require(type(state) in PLAIN_MAPPINGS, "state is not a mapping")
    missing = [k for k in STATE_FIELDS if k not in state]
    extra = sorted(str(k) for k in state if k not in STATE_FIELDS)
    require(not missing and not extra, "state fields differ from this version's ("
            + "; ".join(f"{what} {', '.join(keys)}" for what, keys in
                        (("missing", missing), ("unknown", extra)) if keys) + ")")
    for name, kind in STATE_FIELDS.items():
        value = state[name]
        if kind is list:
            require(type(value) is list and all(type(r) in PLAIN_MAPPINGS and not holds_tensor(r)
                                                for r in value),
                    f"state {name} is not a list of records")
        else:
            require(is_number(value, kind) and value >= 0,
                    f"state {name} is {value!r}, not a non-negative "
                    f"{'integer' if kind is int else 'number'}")


def holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if type(value) in PLAIN_MAPPINGS:
        return any(holds_tensor(v) for v in value.values())
    return type(value) in (list, tuple) and any(holds_tensor(v) for v in value)


def check_optimizer(optimizer: Any, rows: int, dim: int) -> None:
    """The layout of ``torch.optim.Optimizer.state_dict()`` for one group of the two tables:
    ``load_state_dict`` checks only the group sizes, and an optimizer step would crash on the
    rest."""
    require(type(optimizer) in PLAIN_MAPPINGS and sorted(optimizer) == ["param_groups", "state"],
            "optimizer must hold exactly state and param_groups")
    groups, state = optimizer["param_groups"], optimizer["state"]
    require(type(groups) is list and all(type(g) in PLAIN_MAPPINGS for g in groups),
            "optimizer param_groups is not a list of mappings")
    params = [p for g in groups for p in (g.get("params") if type(g.get("params")) is list
                                          else [None])]
    require(all(type(p) is int for p in params) and sorted(params) == list(range(len(TABLES))),
            f"optimizer param_groups do not list the {len(TABLES)} tables once each")
    for group in groups:
        require(is_number(group.get("lr")), "optimizer lr is not a number")
        for key, value in group.items():
            require(key == "params" or type(value) in (int, float, bool, type(None)) or (
                type(value) in (list, tuple) and all(is_number(v) for v in value)),
                f"optimizer setting {key} is {type(value).__name__}")
    require(type(state) in PLAIN_MAPPINGS and all(type(k) is int and k in params for k in state),
            "optimizer state is not keyed by the tables")
    for entries in state.values():
        require(type(entries) in PLAIN_MAPPINGS, "optimizer state entry is not a mapping")
        for key, value in entries.items():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            # A per-entry, per-row or scalar statistic (Adam's moments, Adagrad's row sums,
            # a step count): anything else would not fit the tables it updates.
            require(shape in ((), (rows,), (rows, dim)) or (shape is None and is_number(value)),
                    f"optimizer state {key} does not fit {rows} x {dim} tables")


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
            except RefusedCheckpoint:
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
