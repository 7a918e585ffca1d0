"""Rank-0 outputs: console lines, metrics.jsonl, and (lazily imported) wandb.

Only rank 0 gets a :class:`RunLogger`; every other rank gets a :class:`NullLogger` that does
nothing, so the training loop never asks "am I rank 0?" before logging.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class NullLogger:
    def info(self, message: str) -> None:
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


class RunLogger(NullLogger):
    """Prints progress and appends one JSON object per logged step and per epoch."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None, wandb_run: Any = None):
        self.run_dir = run_dir
        self.stream = stream or sys.stdout
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        self.started = time.time()

    def info(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def rewrite_history(self, history: list[dict[str, Any]]) -> None:
        """On resume: metrics.jsonl becomes exactly what the checkpoint had logged."""
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_step(self, record: dict[str, Any]) -> None:
        record = {"kind": "step", **record}
        self._append(record)
        self.info(
            f"epoch {record['epoch'] + 1} step {record['step']}/{record['steps_in_epoch']} "
            f"loss {record['loss']:.4f} {record['center_words_per_s']:,.0f} center words/s"
        )
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "kind"},
                               step=record["global_step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        record = {"kind": "epoch", **record}
        self._append(record)
        self.info(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, running mean "
            f"{record['loss_cumulative']:.3f}, {record['center_words_per_s']:,.0f} center words/s, "
            f"{record['seconds']:.1f} s"
        )
        if self.wandb_run is not None:
            self.wandb_run.log({f"epoch/{k}": v for k, v in record.items() if k != "kind"},
                               step=record["global_step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        record = {"kind": "eval", **record}
        self._append(record)
        for word, neighbours in record.get("neighbours", {}).items():
            shown = ", ".join(f"{w} {s:.3f}" for w, s in neighbours)
            self.info(f"  {word} -> {shown}")
        scores = {k: v for k, v in record.items() if isinstance(v, float)}
        if scores:
            self.info("  " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in scores.items()},
                               step=record["global_step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
