"""Distributed training on gloo: world size 1 in this process, two spawned ranks against one
process, the gradient exchanges against each other, and torchrun end to end."""

from __future__ import annotations

import copy
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, SMOKE, cli_env, free_port, prepare, run_cli

from dist_w2v.config import PATHS, Config, load_config
from dist_w2v.data.examples import Batch
from dist_w2v.data.prepare import prepare as prepare_folder
from dist_w2v.data.prepared import PrepareSettings
from dist_w2v.errors import UserError
from dist_w2v.outputs.metrics import read_metrics
from dist_w2v.parallel.env import (
    DistEnv,
    distributed,
    launch_rank,
    read_launch_env,
    same_on_every_rank,
)
from dist_w2v.parallel.exchange import resolve_exchange, wrap_model
from dist_w2v.train.loop import Trainer
from dist_w2v.train.run import open_corpus

EXCHANGES = ("allreduce", "allgather", "dense")
FIXED_SHAPE_EXCHANGES = ("allgather", "dense")  # their hooks for the static kernel
PARAMS = ("center.weight", "context.weight")


def tiny_config(ptb: Path, *extra: str) -> Config:
    """300 PTB sentences (about 5,400 tokens) in 4 shards of chunks of at most 1,024 tokens:
    about 1,040 examples an epoch, about 9 global batches of 128, the last ones short and filled
    unevenly by the shards. Two epochs, with logging and a mid-epoch checkpoint, so every
    collective of the loop runs."""
    return load_config(None, [
        f"data.dir={ptb}", "data.max_sentences=300", "data.min_count=2", "model.dim=8",
        "data.shards=4", "data.chunk_tokens=1024",
        "train.epochs=2", "train.batch_size=128", "train.threads=1", "eval.every_epochs=0",
        "log.every_steps=4", "ckpt.every_steps=5", *extra,
    ])


def tiny_trainer(cfg: Config, env: DistEnv, run_dir: Path, cache: Path) -> Trainer:
    return Trainer(cfg, env, run_dir, prepare(cfg.data, cache))


def final_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.fit()
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(autouse=True)
def keep_thread_count():
    """init_distributed sets this process's intra-op threads; give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process(ptb, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one plain process (no process group) over the same global batches."""
    run_dir = tmp_path_factory.mktemp("single")
    return final_parameters(tiny_trainer(tiny_config(ptb), DistEnv(), run_dir, run_dir / "cache"))


@pytest.fixture(scope="module")
def single_process_static(ptb, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same with the static kernel (fixed shapes: every batch padded to its full size)."""
    run_dir = tmp_path_factory.mktemp("single_static")
    return final_parameters(tiny_trainer(tiny_config(ptb, "train.kernel=static"), DistEnv(),
                                         run_dir, run_dir / "cache"))


# -- world size 1, in this process ---------------------------------------------------------------


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_world_size_one_gloo_group_trains_like_a_plain_process(ptb, tmp_path, single_process,
                                                               exchange):
    cfg = tiny_config(ptb, f"dist.grad_exchange={exchange}")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    with distributed(cfg, {}, store=store) as env:
        assert (env.distributed, env.backend, env.world_size, env.rank) == (True, "gloo", 1, 0)
        assert dist.is_initialized() and dist.get_world_size() == 1
        params = final_parameters(tiny_trainer(cfg, env, tmp_path / "run", tmp_path / "cache"))
    assert not dist.is_initialized()
    for name in PARAMS:
        torch.testing.assert_close(params[name], single_process[name], rtol=0, atol=1e-6)


def test_process_group_is_torn_down_when_training_raises(ptb, tmp_path):
    cfg = tiny_config(ptb)
    with pytest.raises(RuntimeError, match="boom"):
        with distributed(cfg, {}, store=dist.FileStore(str(tmp_path / "store"), 1)):
            raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_launch_environment_decides_rank_and_world_size():
    torchrun = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.local_world_size,
            torchrun.launcher) == (3, 1, 8, 4, "torchrun")
    srun = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2",
                            "SLURM_NTASKS_PER_NODE": "3(x2)", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "29500"})
    assert (srun.rank, srun.local_rank, srun.world_size, srun.local_world_size,
            srun.launcher) == (5, 2, 6, 3, "slurm")
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"
    assert read_launch_env({}).world_size == 1
    with pytest.raises(UserError, match="MASTER_ADDR/MASTER_PORT"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0", "WORLD_SIZE": "two"},
     "environment variable WORLD_SIZE='two' must be an integer >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "environment variable RANK='-1' must be an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT='99999' is not a port (1-65535)"),
])
def test_a_hand_set_launch_environment_is_refused_in_one_line(environ, message):
    """torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together; set by hand, a
    missing or bad one made torch raise a traceback, and the error went unsaid on a rank != 0."""
    cfg = load_config(None, ["train.device=cpu", "train.threads=1"])
    with pytest.raises(UserError, match=re.escape(message)):
        with distributed(cfg, environ):
            pass
    assert not dist.is_initialized()
    assert launch_rank({"RANK": "1"}) == 0  # no WORLD_SIZE: no launch, so rank 0 reports
    assert launch_rank({"RANK": "5", "WORLD_SIZE": "2"}) == 0
    assert launch_rank({"RANK": "1", "WORLD_SIZE": "2"}) == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_says_so_in_one_line_after_dist_timeout(tmp_path, rank):
    """RANK/WORLD_SIZE set by hand (or a bare srun) with a rank missing: rank 0 waits for
    clients, rank 1 for a store that is not there. Before, each waited a fixed 30 minutes and
    then raised torch's traceback, and rank 1's error went unsaid (only rank 0 spoke)."""
    port = str(free_port())
    started = time.monotonic()
    result = run_cli("train", "--config", "configs/ptb-quick.yaml", "--run-dir",
                     str(tmp_path / "run"), "dist.timeout_s=3", "train.threads=1",
                     env={"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": port}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"dist-w2v: error: rank {rank} of 2 gave up meeting the other ranks at 127.0.0.1:{port} "
        "after 3 s ("), result.stderr[-2000:]
    assert result.stderr.rstrip().endswith("or raise dist.timeout_s")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def test_auto_exchange_is_allgather_on_nccl_and_nccl_refuses_allreduce():
    assert resolve_exchange("auto", "nccl") == "allgather"
    assert resolve_exchange("auto", "gloo") == "allreduce"
    with pytest.raises(UserError, match="NCCL has no sparse allreduce"):
        resolve_exchange("allreduce", "nccl")


# -- two spawned ranks ---------------------------------------------------------------------------


def exchanged_gradients(trainer: Trainer, env: DistEnv) -> dict[str, dict[str, torch.Tensor]]:
    """Each exchange's gradient of this rank's slice, plus the local gradient before exchange.

    Two batches: this rank's part of global batch 0, and a 5-example batch that only rank 0 has
    (rank 1's slice is empty, as at the end of an epoch whose last batch has fewer examples than
    ranks). Every model path (train.path) is checked. Also checks that the exchanged gradient
    stays sparse.
    """
    trainer.stream.start_epoch(0)
    even = trainer.stream.next_batch()
    rows = slice(0, 5 if env.rank == 0 else 0)
    first_five = Batch(even.centers[rows], even.contexts_negatives[rows], even.num_contexts[rows],
                       even.num_negatives)
    batches = {"even": even, "one_rank_empty": first_five}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (case, batch), path, exchange in itertools.product(batches.items(), PATHS,
                                                           ("local", *EXCHANGES)):
        model = copy.deepcopy(trainer.model)
        model.path = path
        module = model if exchange == "local" else wrap_model(model, env, exchange)
        loss = module(batch.centers, batch.contexts_negatives, batch.num_contexts,
                      batch.num_negatives).sum()
        loss.backward()
        for name, param in model.named_parameters():
            assert param.grad.is_sparse, f"{exchange} made {name}'s gradient dense"
            out.setdefault(f"{case}/{path}/{exchange}", {})[name] = param.grad.to_dense()
    return out


def two_rank_worker(rank: int, ptb: str, workdir: str) -> None:
    """One of two ranks: train once per exchange, record gradients and the batch-size error."""
    workdir_path = Path(workdir)
    environ = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
    store = dist.FileStore(str(workdir_path / "store"), 2)
    results: dict[str, object] = {}
    with distributed(tiny_config(Path(ptb)), environ, store=store) as env:
        for exchange in EXCHANGES:
            cfg = tiny_config(Path(ptb), f"dist.grad_exchange={exchange}")
            trainer = tiny_trainer(cfg, env, workdir_path / exchange, workdir_path / "cache")
            results[f"params/{exchange}"] = final_parameters(trainer)
        for exchange in FIXED_SHAPE_EXCHANGES:
            cfg = tiny_config(Path(ptb), f"dist.grad_exchange={exchange}", "train.kernel=static")
            static = tiny_trainer(cfg, env, workdir_path / f"static-{exchange}",
                                  workdir_path / "cache")
            results[f"params/static-{exchange}"] = final_parameters(static)
        results["grads"] = exchanged_gradients(trainer, env)
        for name, setting in (("batch_size_error", "train.batch_size=129"),
                              ("shards_error", "data.shards=3")):
            try:
                tiny_trainer(tiny_config(Path(ptb), setting), env, workdir_path / "odd",
                             workdir_path / "cache")
            except UserError as exc:
                results[name] = str(exc)
        results["same_text"] = same_on_every_rank(env, "one corpus")
        results["ranks_text"] = same_on_every_rank(env, f"corpus of rank {rank}")
        results["corpus_error"] = opened_corpus_error(rank, env, workdir_path, ptb)
    torch.save(results, workdir_path / f"rank{rank}.pt")


def opened_corpus_error(rank: int, env: DistEnv, workdir: Path, ptb: str) -> str:
    """What open_corpus says when each rank's load finds another prepare of the folder (as
    when it is prepared again between the ranks' loads): here two folders, one per rank."""
    text = workdir / f"text{rank}.txt"
    text.write_text("a b c d\nb c d a\nc d a b\n" * (rank + 1))
    prepare_folder([text], workdir / f"corpus{rank}", PrepareSettings(min_count=1),
            say=lambda _: None)
    cfg = load_config(None, [f"data.prepared={workdir / f'corpus{rank}'}", "train.threads=1"])
    try:
        open_corpus(cfg, env, {"DIST_W2V_DATA": ptb}, lambda _: None)
    except UserError as exc:
        return str(exc)
    return "opened"


def spawn(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """torch.multiprocessing.spawn with a deadline; no child outlives the call."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"spawned ranks still running after {timeout} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


@pytest.fixture(scope="module")
def two_ranks(ptb, tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("two_ranks")
    spawn(two_rank_worker, (str(ptb), str(workdir)), nprocs=2, timeout=240)
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_two_ranks_hold_identical_parameters(two_ranks, exchange):
    rank0, rank1 = (r[f"params/{exchange}"] for r in two_ranks)
    for name in PARAMS:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_two_ranks_equal_one_process_over_the_same_global_batches(two_ranks, single_process,
                                                                  exchange):
    params = two_ranks[0][f"params/{exchange}"]
    for name in PARAMS:
        assert not torch.equal(params[name], torch.zeros_like(params[name]))
        torch.testing.assert_close(params[name], single_process[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("exchange", FIXED_SHAPE_EXCHANGES)
def test_two_static_kernel_ranks_equal_one_static_process(two_ranks, single_process_static,
                                                          exchange):
    """The fixed-shape hooks: rows gathered with repeats (and dense rows marked as padding)
    train like one process, also over the epochs' short tail batches, padded on every rank."""
    rank0, rank1 = (r[f"params/static-{exchange}"] for r in two_ranks)
    for name in PARAMS:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], single_process_static[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["even", "one_rank_empty"])
@pytest.mark.parametrize("exchange", ["allgather", "dense"])
def test_hooks_give_the_builtin_sparse_allreduce_gradient(two_ranks, case, path, exchange):
    grads = [r["grads"] for r in two_ranks]
    for name in PARAMS:
        local = [g[f"{case}/{path}/local"][name] for g in grads]
        local_mean = (local[0] + local[1]) / 2
        builtin = grads[0][f"{case}/{path}/allreduce"][name]
        hooked = grads[0][f"{case}/{path}/{exchange}"][name]
        assert torch.equal(hooked, grads[1][f"{case}/{path}/{exchange}"][name])
        torch.testing.assert_close(builtin, local_mean, rtol=0, atol=1e-7)
        # Bit for bit: on two ranks a/2 + b/2 and (a + b)/2 round the same way.
        assert torch.equal(hooked, builtin)
        assert hooked.abs().sum() > 0


def test_ranks_that_opened_different_corpora_stop_before_training(two_ranks):
    """Each rank loads the prepared folder itself: a re-prepare between two ranks' loads had
    them start on two corpora (DDP's shape check, a traceback; or silently, same shapes)."""
    assert [r["same_text"] for r in two_ranks] == [True, True]
    assert [r["ranks_text"] for r in two_ranks] == [False, False]
    for rank in two_ranks:
        assert rank["corpus_error"].startswith("the ranks opened different corpora at ")


def test_global_batch_and_shards_that_do_not_divide_are_refused(two_ranks):
    for rank in two_ranks:
        assert rank["batch_size_error"].startswith(
            "train.batch_size=129 must divide by data.shards=4")
        assert rank["shards_error"] == (
            "data.shards=3 must divide by the world size 2; pick a multiple of 2")


# -- torchrun end to end -------------------------------------------------------------------------


def run_torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m dist_w2v.cli train ARGS``; on a timeout,
    SIGTERM lets torchrun stop its workers before the test fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "dist_w2v.cli", "train", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=cli_env())
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_torchrun_two_processes_end_to_end(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    several_chunks = ("data.shards=4", "data.chunk_tokens=2048")
    result = run_torchrun(["--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
                           f"data.corpus={small_corpus}", *SMOKE, *several_chunks], timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if "world size 2 (gloo)" in line]) == 1, result.stdout
    assert len([line for line in lines if re.match(r"epoch 1\b.*: loss", line)]) == 1
    assert len([line for line in lines if line.startswith("done: outputs in")]) == 1
    assert "error" not in result.stderr.lower(), result.stderr
    assert [p.name for p in run_dir.glob("*metrics*")] == ["metrics.jsonl"]
    epochs = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 1
    for output in ("center", "context", "vocab"):
        assert len(list(run_dir.glob(f"{output}*"))) == 1
    assert not [p for p in run_dir.rglob("*") if re.search(r"rank[_-]?1", p.name)]
    os.stat(run_dir / "config.yaml")
    # One plain process trains the same centers into the same tables.
    plain = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(tmp_path / "plain"),
                    f"data.corpus={small_corpus}", *SMOKE, *several_chunks)
    assert plain.returncode == 0, plain.stderr
    plain_epochs = [r for r in read_metrics(tmp_path / "plain") if r["kind"] == "epoch"]
    two_epochs = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    assert two_epochs[0]["center_words"] == plain_epochs[0]["center_words"] > 5000
    np.testing.assert_allclose(np.load(run_dir / "center.npy"),
                               np.load(tmp_path / "plain" / "center.npy"), rtol=0, atol=1e-5)
