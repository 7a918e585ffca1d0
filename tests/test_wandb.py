"""Rank-0 run outputs: a wandb offline run read back from its .wandb file, metrics.jsonl, the
loss plot, and progress output."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, cli_env, run_cli

from dist_w2v.config import load_config
from dist_w2v.outputs.metrics import RunLogger, wandb_init_arguments
from dist_w2v.parallel.env import DistEnv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -- reading a .wandb file (see DESIGN.md "wandb") ------------------------------------------

WANDB_FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of a run-*.wandb file, parsed as wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    payloads, pending, pos = [], b"", WANDB_FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: too short for a chunk header
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero padding up to the block end
            pos += left_in_block
            continue
        body = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            payloads.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            payloads.append(pending + body)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def items(entries) -> dict:
    return {"/".join(e.nested_key) or e.key: json.loads(e.value_json) for e in entries}


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


# -- one offline run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, ptb):
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("offline")
    run_dir, wandb_dir = root / "run", root / "wandb-dir"
    wandb_dir.mkdir()
    result = run_cli(
        "train", "--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
        "data.max_sentences=2000", *SMOKE, "train.epochs=2", "train.batch_size=128",
        "log.every_steps=20", "eval.every_epochs=1", "eval.probes=stock,market",
        "log.wandb=offline", "log.project=from-config", "log.run_name=toy-run", "log.tags=a,b",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
             "WANDB_PROJECT": "from-env"},
    )
    assert result.returncode == 0, result.stderr
    (wandb_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, wandb_records(wandb_file), metrics, result.stdout


def test_wandb_history_holds_what_metrics_jsonl_holds(offline_run):
    _, records, metrics, _ = offline_run
    history = [items(h.item) for h in of_type(records, "history")]
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    steps = [r for r in metrics if r["kind"] == "step"]
    assert len(steps) >= 4
    for record in steps:
        logged = by_step[record["global_step"]]
        assert logged["train/loss"] == record["loss"]
        assert logged["train/lr"] == record["lr"]
        assert logged["train/center_words_per_s"] == record["center_words_per_s"]
    for kind in ("epoch", "eval"):
        assert len([r for r in metrics if r["kind"] == kind]) == 2
    for epoch, evaluation in zip([r for r in metrics if r["kind"] == "epoch"],
                                 [r for r in metrics if r["kind"] == "eval"], strict=True):
        logged = by_step[epoch["global_step"]]
        assert logged["epoch/loss"] == epoch["loss"]
        assert logged["epoch/loss_cumulative"] == epoch["loss_cumulative"]
        if "benchmarks" in evaluation:  # present whenever gensim is importable
            bench = evaluation["benchmarks"]
            assert logged["eval/wordsim353/spearman"] == bench["wordsim353"]["spearman"]
            assert logged["eval/analogy/coverage"] == bench["analogy"]["coverage"]
    summary = {}
    for update in of_type(records, "summary"):
        summary.update(items(update.update))
    assert summary["eval/neighbours/stock"].count(",") == 2  # k=3 neighbours, as text


def test_wandb_run_takes_config_and_environment(offline_run):
    _, records, _, _ = offline_run
    (run,) = of_type(records, "run")
    assert run.project == "from-env"  # WANDB_PROJECT beats log.project
    assert run.display_name == "toy-run" and list(run.tags) == ["a", "b"]
    config = items(run.config.update)
    assert config["train"]["epochs"] == 2 and config["world_size"] == 1
    assert config["log"]["wandb"] == "offline"


def test_metrics_jsonl_records_steps_epochs_and_evaluations(offline_run):
    _, _, metrics, _ = offline_run
    assert [r["kind"] for r in metrics if r["kind"] != "step"] == ["epoch", "eval"] * 2
    steps = [r for r in metrics if r["kind"] == "step"]
    assert {"epoch", "step", "steps_in_epoch", "global_step", "window_steps", "loss",
            "center_words_per_s", "lr"} <= set(steps[0])
    # Each record covers the steps since the previous one of its epoch (or since its start).
    for before, record in zip([None, *steps[:-1]], steps, strict=True):
        same_epoch = before is not None and before["epoch"] == record["epoch"]
        assert record["window_steps"] == record["step"] - (before["step"] if same_epoch else 0)
    assert all(r["global_step"] % 20 == 0 for r in steps)  # logged every 20 global steps
    assert [r["global_step"] for r in steps] == sorted(r["global_step"] for r in steps)
    evaluation = metrics[-1]
    assert evaluation["epoch"] == 2 and set(evaluation["neighbours"]) == {"stock", "market"}
    assert all(len(found) == 3 for found in evaluation["neighbours"].values())


def test_loss_curve_png_written_at_the_end(offline_run):
    run_dir, _, _, stdout = offline_run
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5_000
    assert f"loss curve: {run_dir / 'loss.png'}" in stdout


def test_plain_lines_when_output_is_not_a_terminal(offline_run):
    _, _, _, stdout = offline_run  # captured through a pipe, as in CI and SLURM logs
    assert "\r" not in stdout
    assert "epoch 1/2 step 20/" in stdout and "center words/s" in stdout


# -- progress output and wandb arguments without training ------------------------------------


def step_record(step: int) -> dict:
    return {"epoch": 0, "step": step, "steps_in_epoch": 40, "global_step": step, "loss": 0.5,
            "center_words_per_s": 12345.0, "lr": 0.002}


def test_progress_bar_redraws_one_line_on_a_terminal(tmp_path):
    stream = io.StringIO()
    logger = RunLogger(tmp_path, stream=stream, epochs=3, progress=True)
    logger.log_step(step_record(10))
    logger.log_step(step_record(20))
    logger.info("epoch 1: done")
    text = stream.getvalue()
    assert "\repoch 1/3 [" in text and "] 20/40 loss 0.5000 12,345 center words/s" in text
    assert text.count("\n") == 1 and text.endswith("epoch 1: done\n")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_no_progress_bar_when_the_stream_is_not_a_terminal(tmp_path):
    stream = io.StringIO()
    RunLogger(tmp_path, stream=stream, epochs=3).log_step(step_record(10))
    assert stream.getvalue() == "epoch 1/3 step 10/40 loss 0.5000 12,345 center words/s\n"


def test_wandb_environment_variables_beat_the_config(tmp_path):
    cfg = load_config(None, ["log.wandb=online", "log.project=p", "log.entity=e",
                                           "log.run_name=n", "log.tags=x,y"])
    plain = wandb_init_arguments(cfg, DistEnv(), tmp_path, resume=False, environ={})
    assert {k: plain[k] for k in ("mode", "project", "entity", "name", "tags", "dir")} == {
        "mode": "online", "project": "p", "entity": "e", "name": "n", "tags": ["x", "y"],
        "dir": str(tmp_path)}
    environ = {"WANDB_MODE": "offline", "WANDB_PROJECT": "P", "WANDB_ENTITY": "E",
               "WANDB_NAME": "N", "WANDB_TAGS": "z", "WANDB_DIR": "/elsewhere"}
    from_env = wandb_init_arguments(cfg, DistEnv(), tmp_path, resume=False, environ=environ)
    assert from_env["mode"] == "offline"
    assert not {"project", "entity", "name", "tags", "dir"} & set(from_env)  # wandb reads env


def test_resumed_run_continues_its_wandb_run(tmp_path):
    cfg = load_config(None, ["log.wandb=offline"])
    first = wandb_init_arguments(cfg, DistEnv(), tmp_path, resume=False, environ={})["id"]
    again = wandb_init_arguments(cfg, DistEnv(), tmp_path, resume=True, environ={})["id"]
    fresh = wandb_init_arguments(cfg, DistEnv(), tmp_path, resume=False, environ={})["id"]
    assert again == first and fresh != first


def test_wandb_is_imported_lazily():
    code = ("import sys, dist_w2v.cli, dist_w2v.train.run, dist_w2v.train.loop, "
            "dist_w2v.outputs.metrics; "
            "print('wandb' in sys.modules, 'matplotlib' in sys.modules, 'gensim' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=cli_env(), cwd=REPO, timeout=60)
    assert result.stdout.split() == ["False", "False", "False"], result.stderr
