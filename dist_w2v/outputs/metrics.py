"""Rank-0 outputs: console lines or a progress bar, metrics.jsonl, wandb, the loss plot.

Only rank 0 gets a :class:`RunLogger`; every other rank gets a :class:`NullLogger` that does
nothing, so the training loop never asks "am I rank 0?" before logging.

wandb is imported only when ``log.wandb`` is offline or online, and only on rank 0. Its
``WANDB_*`` environment variables behave as wandb users expect and win over the config file:
``WANDB_MODE`` (e.g. offline on compute nodes, disabled in CI), ``WANDB_PROJECT``,
``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_TAGS``, ``WANDB_DIR`` (default: the run directory).
``log.wandb: off`` always means no wandb at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from dist_w2v.atomic import write_text_atomically
from dist_w2v.config import Config
from dist_w2v.errors import UserError
from dist_w2v.outputs import strict_json
from dist_w2v.outputs.console import detach_stdout
from dist_w2v.outputs.evaluate import format_neighbours, headline
from dist_w2v.outputs.plot import plot_loss_curve
from dist_w2v.parallel.env import DistEnv

LOSS_PLOT = "loss.png"
WANDB_ID_FILE = "wandb-run-id"


class NullLogger:
    def info(self, message: str) -> None:
        pass

    def use_wandb(self, run: Any) -> None:
        pass

    def rewrite_history(self, history: list[dict[str, Any]]) -> None:
        pass

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressLine:
    """A one-line progress bar redrawn in place with ``\\r`` (a terminal's, not a log file's)."""

    def __init__(self, stream: TextIO, width: int = 30):
        self.stream = stream
        self.width = width
        self.shown = 0  # characters currently on the line

    def draw(self, label: str, done: int, total: int, suffix: str) -> None:
        filled = round(self.width * done / max(total, 1))
        line = f"{label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {suffix}"
        self.stream.write("\r" + line.ljust(self.shown))
        self.stream.flush()
        self.shown = len(line)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0


class RunLogger(NullLogger):
    """Prints progress and appends one JSON object per logged step, per epoch, per evaluation.

    ``progress``: redraw one bar line per logged step (default: when the stream is a terminal);
    otherwise every logged step is a plain line, as CI and SLURM logs want.
    """

    def __init__(self, run_dir: Path, stream: TextIO | None = None, wandb_run: Any = None,
                 epochs: int | None = None, progress: bool | None = None,
                 title: str | None = None):
        self.run_dir = run_dir
        self.title = title or Path(run_dir).name
        self.stream = stream or sys.stdout
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        self.epochs = epochs
        self.started = time.time()
        if progress is None:
            progress = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = ProgressLine(self.stream) if progress else None

    def info(self, message: str) -> None:
        def write() -> None:
            if self.bar is not None:
                self.bar.clear()
            print(message, file=self.stream, flush=True)

        self._to_console(write)

    def _to_console(self, write: Callable[[], None]) -> None:
        """The console lines copy what metrics.jsonl keeps, so a console that cannot take them
        (a full disk behind ``> log``, a ``| head`` that left) ends them with one warning on
        stderr, never the run and its unsaved steps."""
        if self.stream is None:
            return
        try:
            write()
        except OSError as exc:
            if self.stream is sys.stdout:
                detach_stdout()
            self.stream, self.bar = None, None
            with contextlib.suppress(OSError):
                print(f"dist-w2v: warning: cannot write the log to the console "
                      f"({exc.strerror or exc}); training goes on, and {self.metrics_path} "
                      "keeps every record", file=sys.stderr, flush=True)

    def use_wandb(self, run: Any) -> None:
        self.wandb_run = run

    def rewrite_history(self, history: list[dict[str, Any]]) -> None:
        """On resume: metrics.jsonl becomes exactly what the checkpoint had logged."""
        try:
            write_text_atomically(self.metrics_path,
                                  "".join(strict_json.dumps(r) + "\n" for r in history))
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _append(self, record: dict[str, Any]) -> None:
        """One whole line or none: a line cut by a full disk would make the file unreadable
        (the loss plot at the end, and every later reader, parse it)."""
        line = memoryview((strict_json.dumps(record) + "\n").encode("utf-8"))
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:
            start = os.fstat(fd).st_size
            while line:
                line = line[os.write(fd, line):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise self._unwritable(exc) from None
        finally:
            os.close(fd)

    def _unwritable(self, exc: OSError) -> UserError:
        return UserError(f"cannot write {self.metrics_path} ({exc.strerror or exc}); free space "
                         "or fix its permissions, then continue with --resume auto (the "
                         "checkpoints saved so far are kept)")

    def _wandb_log(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.wandb_run is not None and values:
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def log_step(self, record: dict[str, Any]) -> None:
        record = {"kind": "step", **record}
        self._append(record)
        epoch = f"epoch {record['epoch'] + 1}" + (f"/{self.epochs}" if self.epochs else "")
        speed = f"loss {record['loss']:.4f} {record['center_words_per_s']:,.0f} center words/s"
        if self.bar is not None:
            bar = self.bar
            self._to_console(lambda: bar.draw(epoch, record["step"], record["steps_in_epoch"],
                                              speed))
        else:
            self.info(f"{epoch} step {record['step']}/{record['steps_in_epoch']} {speed}")
        self._wandb_log("train", {k: v for k, v in record.items() if k != "kind"},
                        record["global_step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        record = {"kind": "epoch", **record}
        self._append(record)
        self.info(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, running mean "
            f"{record['loss_cumulative']:.3f}, {record['center_words_per_s']:,.0f} center words/s, "
            f"{record['seconds']:.1f} s"
        )
        self._wandb_log("epoch", {k: v for k, v in record.items() if k != "kind"},
                        record["global_step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        record = {"kind": "eval", **record}
        self._append(record)
        neighbours = record.get("neighbours", {})
        for word, found in neighbours.items():
            self.info(f"  {word} -> {format_neighbours(found)}")
        benchmarks = record.get("benchmarks", {})
        if benchmarks:
            self.info("  " + headline(benchmarks))
        self._wandb_log("eval", flatten_scores(benchmarks), record["global_step"])
        if self.wandb_run is not None:
            for word, found in neighbours.items():
                self.wandb_run.summary[f"eval/neighbours/{word}"] = format_neighbours(found)

    def close(self) -> None:
        """End of training: finish the bar, draw the loss curve, close the wandb run."""
        if self.bar is not None:
            self._to_console(self.bar.clear)
        try:
            plot = plot_loss_curve(read_metrics(self.run_dir), self.run_dir / LOSS_PLOT,
                                   self.title)
        except OSError as exc:  # a full disk: say so, and let the run's own outcome stand
            self.info(f"could not write {self.run_dir / LOSS_PLOT} ({exc.strerror or exc})")
            plot = None
        if plot is not None:
            self.info(f"loss curve: {plot}")
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def flatten_scores(results: dict[str, Any]) -> dict[str, float]:
    """{"wordsim353": {"spearman": 0.3}} -> {"wordsim353/spearman": 0.3}, numbers only."""
    flat = {}
    for name, scores in results.items():
        for key, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{name}/{key}"] = value
    return flat


def make_logger(cfg: Config, env: DistEnv, run_dir: Path) -> NullLogger:
    """A :class:`RunLogger` on rank 0, a :class:`NullLogger` elsewhere."""
    if not env.is_main:
        return NullLogger()
    return RunLogger(run_dir, epochs=cfg.train.epochs, title=cfg.log.run_name or run_dir.name)


def wandb_init_arguments(cfg: Config, env: DistEnv, run_dir: Path, resume: bool,
                         environ: Mapping[str, str]) -> dict[str, Any]:
    """wandb.init's keyword arguments: the config's choices where no WANDB_* variable is set."""
    log = cfg.log
    chosen: dict[str, Any] = {
        "mode": environ.get("WANDB_MODE") or log.wandb,
        "config": {**cfg.to_dict(), "world_size": env.world_size},
        "id": wandb_run_id(run_dir, resume),
        "resume": "allow",
    }
    from_config = {
        "WANDB_PROJECT": ("project", log.project),
        "WANDB_ENTITY": ("entity", log.entity),
        "WANDB_NAME": ("name", log.run_name),
        "WANDB_TAGS": ("tags", log.tags or None),
        "WANDB_DIR": ("dir", str(run_dir)),
    }
    for variable, (argument, value) in from_config.items():
        if not environ.get(variable) and value is not None:
            chosen[argument] = value
    return chosen


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """A resumed run continues its wandb run; a fresh one starts a new id (kept in the run dir)."""
    path = run_dir / WANDB_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def start_wandb(cfg: Config, env: DistEnv, run_dir: Path, resume: bool,
                environ: Mapping[str, str]) -> Any:
    """The rank-0 wandb run, or None (other ranks, or ``log.wandb: off``)."""
    if not env.is_main or cfg.log.wandb == "off":
        return None
    try:
        import wandb
    except ImportError:
        raise UserError(
            f"log.wandb={cfg.log.wandb} needs wandb: pip install wandb, or set log.wandb=off"
        ) from None
    try:
        return wandb.init(**wandb_init_arguments(cfg, env, run_dir, resume, environ))
    except wandb.errors.UsageError as exc:  # not logged in, bad entity, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"wandb could not start ({reason}); run `wandb login` or set WANDB_API_KEY, "
            "or log offline with log.wandb=offline (WANDB_MODE=offline)"
        ) from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
