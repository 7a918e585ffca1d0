"""What each sparse-gradient exchange costs per training step: gloo, 2 ranks, 1 thread each.

    python benchmarks/exchange_cost.py --steps 30 --batch-sizes 512 4096 [key=value ...]

Two spawned ranks train PTB with the real ``Trainer.train_step`` (forward, backward through DDP,
SparseAdam step) at each global batch size, once per exchange (``allreduce``: gloo's built-in
sparse allreduce; ``allgather`` and ``dense``: the hooks of dist_w2v/grad_exchange.py), plus a
``none`` row: the same step on one rank's slice without DDP, for scale. Every round runs each
exchange in turn, so a busy machine slows them alike. Per exchange it reports:

* step: median wall time of a full step, exchange included (DDP as in training);
* exchange: median time of the exchange alone, both tables, timed in separate steps through a
  hook that first lines the ranks up with a barrier (so waiting for the slower rank is not
  counted) and then runs the same collective DDP would run;
* share: exchange / step;
* sent: bytes each rank sends per step, both tables. On 2 ranks an all-gather sends the local
  payload once and gloo's ring allreduce sends the buffer's size, so: allreduce = local unique
  rows x (8 + 4D) bytes (gloo coalesces, then all-gathers indices and values); allgather = the
  longest rank's rows x (8 + 4D) (it pads to the longest); dense = V x (D+1) x 4.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as objects.

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_w2v.config import load_config
from dist_w2v.data.prepared import load_prepared
from dist_w2v.data.sources import prepared_dir_for
from dist_w2v.parallel.env import DistEnv, user_dirs
from dist_w2v.parallel.exchange import allgather_sparse, dense_exchange, wrap_model
from dist_w2v.train.loop import Trainer, init_model
from dist_w2v.train.optim import build_optimizer

WORLD_SIZE = 2
EXCHANGES = ("allreduce", "allgather", "dense")
INDEX_BYTES = 8


def builtin_sparse_allreduce(grad: torch.Tensor) -> torch.Tensor:
    """What DDP does without a hook: divide the local gradient, then gloo's sparse allreduce."""
    work = dist.all_reduce(grad / dist.get_world_size(), async_op=True)
    return work.get_future().wait()[0]


EXCHANGE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "allreduce": builtin_sparse_allreduce,
    "allgather": allgather_sparse,
    "dense": dense_exchange,
}


class TimedExchange:
    """A DDP comm hook that runs one exchange after a barrier and records its time and rows."""

    def __init__(self, exchange: Callable[[torch.Tensor], torch.Tensor]):
        self.exchange = exchange
        self.recording = False
        self.seconds: list[float] = []
        self.local_rows: list[int] = []

    def hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        grad = bucket.buffer()
        dist.barrier()
        started = time.perf_counter()
        result = self.exchange(grad)
        if self.recording:
            self.seconds.append(time.perf_counter() - started)
            self.local_rows.append(int(grad.coalesce().indices().shape[1]))
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(result)
        return future


def fresh_model(trainer: Trainer) -> None:
    """New tables and optimizer, so every exchange starts from the same state."""
    trainer.model = init_model(len(trainer.vocab), trainer.cfg, trainer.env.device)
    trainer.optimizer = build_optimizer(trainer.cfg.train, trainer.model)


def timed_steps(trainer: Trainer, module: torch.nn.Module, batches, plan, steps: int,
                warmup: int, first: int, timer: TimedExchange | None = None) -> list[float]:
    """Step times after ``warmup`` untimed steps; ``timer`` records only the timed steps."""
    seconds = []
    for i in range(warmup + steps):
        if timer is not None:
            timer.recording = i >= warmup
        trainer.state.step = (first + i) % len(batches)
        started = time.perf_counter()
        trainer.train_step(module, batches[trainer.state.step], plan, epoch=0)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    if timer is not None:
        timer.recording = False
    return seconds


def measure(rank: int, args: argparse.Namespace, workdir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(workdir, "store"), WORLD_SIZE)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE)
    env = DistEnv(rank, rank, WORLD_SIZE, WORLD_SIZE, torch.device("cpu"), "gloo")
    rows = []
    try:
        for batch_size in args.batch_sizes:
            cfg = load_config(args.config, [*args.overrides, f"train.batch_size={batch_size}",
                                            "train.threads=1"])
            corpus = load_prepared(prepared_dir_for(cfg.data, user_dirs(), print))
            trainer = Trainer(cfg, env, Path(workdir) / "run", corpus)
            plan = trainer.stream.start_epoch(0)
            examples = [trainer.stream.next_batch() for _ in range(plan.num_steps - 1)]
            step_s = {name: [] for name in ("none", *EXCHANGES)}
            timers = {name: TimedExchange(EXCHANGE_FUNCTIONS[name]) for name in EXCHANGES}
            for round_index in range(args.rounds):
                first = round_index * (args.steps + args.warmup)
                fresh_model(trainer)
                dist.barrier()
                step_s["none"] += timed_steps(trainer, trainer.model, examples, plan, args.steps,
                                              args.warmup, first)
                for name in EXCHANGES:
                    fresh_model(trainer)
                    ddp = wrap_model(trainer.model, env, name)
                    step_s[name] += timed_steps(trainer, ddp, examples, plan, args.steps,
                                                args.warmup, first)
                    fresh_model(trainer)
                    ddp = torch.nn.parallel.DistributedDataParallel(trainer.model)
                    ddp.register_comm_hook(None, timers[name].hook)
                    timed_steps(trainer, ddp, examples, plan, args.steps, args.warmup, first,
                                timers[name])
            row = summarize(batch_size, cfg.model.dim, len(trainer.vocab), step_s, timers)
            row["setup"] = f"train.path={cfg.train.path}, train.optimizer={cfg.train.optimizer}"
            rows.append(row)
        gathered: list[object] = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            print_table(gathered, args)
    finally:
        dist.destroy_process_group()


def summarize(batch_size: int, dim: int, vocab_size: int, step_s: dict[str, list[float]],
              timers: dict[str, TimedExchange]) -> dict:
    """This rank's medians; a step makes two hook calls (one bucket per table)."""
    row = {"batch_size": batch_size, "dim": dim, "vocab": vocab_size, "step": {}, "exchange": {},
           "rows": {}}
    for name, seconds in step_s.items():
        row["step"][name] = statistics.median(seconds)
    for name, timer in timers.items():
        per_step = [a + b for a, b in zip(timer.seconds[::2], timer.seconds[1::2], strict=True)]
        rows = [a + b for a, b in zip(timer.local_rows[::2], timer.local_rows[1::2], strict=True)]
        row["exchange"][name] = statistics.median(per_step)
        row["rows"][name] = rows
    return row


def print_table(per_rank: list, args: argparse.Namespace) -> None:
    print(f"gloo, {WORLD_SIZE} ranks x 1 thread, {per_rank[0][0]['setup']}, {args.steps} steps "
          f"x {args.rounds} rounds per cell (medians; the slower rank's median shown)")
    print()
    print("| global batch | exchange | step ms | exchange ms | share | sent per rank per step |")
    print("|---:|---|---:|---:|---:|---:|")
    for cell, _ in enumerate(per_rank[0]):
        ranks = [rank_rows[cell] for rank_rows in per_rank]
        first = ranks[0]
        dim, vocab = first["dim"], first["vocab"]
        row_bytes = INDEX_BYTES + 4 * dim
        print(f"| {first['batch_size']} | none (one rank, no DDP) | "
              f"{max(r['step']['none'] for r in ranks) * 1e3:.1f} | - | - | - |")
        for name in EXCHANGES:
            step = max(r["step"][name] for r in ranks)
            exchange = max(r["exchange"][name] for r in ranks)
            local_rows = [r["rows"][name] for r in ranks]
            per_step = list(zip(*local_rows, strict=True))  # (rank 0 rows, rank 1 rows) per step
            if name == "dense":
                sent = 2 * vocab * (dim + 1) * 4  # two tables
            elif name == "allgather":
                sent = statistics.median(max(rows) for rows in per_step) * row_bytes
            else:
                sent = statistics.median(statistics.mean(rows) for rows in per_step) * row_bytes
            print(f"| {first['batch_size']} | {name} | {step * 1e3:.1f} | {exchange * 1e3:.2f} | "
                  f"{exchange / step:.0%} | {sent / 1e6:.2f} MB |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ptb.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per cell and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each cell")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.dim=300")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(measure, args=(args, workdir), nprocs=WORLD_SIZE, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
