"""Process setup: who this process is, which device and backend it uses, and teardown.

This is the only module that reads the environment: the launcher's (torchrun's RANK /
WORLD_SIZE / LOCAL_RANK, or SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID for a bare
``srun``) and the user's folders ($DIST_W2V_DATA, $XDG_CACHE_HOME). Everything else receives
the frozen :class:`DistEnv` and :class:`UserDirs` built here.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dist_w2v.config import Config
from dist_w2v.errors import RankError, UserError
from dist_w2v.parallel.allocator import keep_freed_memory
from dist_w2v.parallel.cores import usable_cores


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    """None for a plain single process (no process group, no DDP)."""
    restart_count: int = 0
    """Restarts of this run so far: torchrun's (TORCHELASTIC_RESTART_COUNT) plus SLURM requeues
    (SLURM_RESTART_COUNT). A restarted run resumes from its newest checkpoint by itself."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


@dataclass(frozen=True)
class UserDirs:
    """Where data lives when the config does not say."""

    ptb: Path | None
    """$DIST_W2V_DATA: a folder holding ptb.train.txt (else PTB is downloaded into the cache)."""
    cache: Path
    """$XDG_CACHE_HOME/dist-w2v (default ~/.cache/dist-w2v): downloads and prepared corpora."""


def user_dirs(environ: Mapping[str, str] | None = None) -> UserDirs:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    ptb = environ.get("DIST_W2V_DATA")
    return UserDirs(ptb=Path(ptb).expanduser() if ptb else None,
                    cache=Path(base).expanduser() / "dist-w2v")


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun", "slurm" or "none"


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    """torchrun (or any env:// launcher) sets both; one alone is no launch."""
    return "WORLD_SIZE" in environ and "RANK" in environ


def environ_int(environ: Mapping[str, str], name: str, default: str, low: int = 0) -> int:
    """A launcher's integer variable, or a one-line error naming it."""
    raw = environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        raise UserError(f"environment variable {name}={raw!r} must be an integer >= {low}; launch "
                        "with torchrun, which sets it, or unset it")
    return value


def read_launch_env(environ: Mapping[str, str]) -> LaunchInfo:
    """Ranks from torchrun's variables, else a multi-task srun's, else a single process."""
    if launched_by_torchrun(environ):
        world_size = environ_int(environ, "WORLD_SIZE", "1", low=1)
        return LaunchInfo(
            rank=environ_int(environ, "RANK", "0"),
            local_rank=environ_int(environ, "LOCAL_RANK", "0"),
            world_size=world_size,
            local_world_size=environ_int(environ, "LOCAL_WORLD_SIZE", str(world_size), low=1),
            launcher="torchrun",
        )
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise UserError(
                "launched by srun with several tasks but MASTER_ADDR/MASTER_PORT are unset; "
                "export them in the job script, or launch through slurm/train.sbatch (torchrun)"
            )
        return LaunchInfo(
            rank=int(environ["SLURM_PROCID"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            world_size=int(environ["SLURM_NTASKS"]),
            local_world_size=tasks_on_first_node(environ.get("SLURM_NTASKS_PER_NODE", "1")),
            launcher="slurm",
        )
    return LaunchInfo(0, 0, 1, 1, "none")


def launch_rank(environ: Mapping[str, str]) -> int:
    """This process's global rank as its launcher set it (0 without one, or when unreadable);
    cheap and never raising, for deciding who reports an error."""
    try:
        if launched_by_torchrun(environ):
            rank = int(environ["RANK"])
            # A rank the world size cannot hold is a hand-set mistake, whose error must show.
            return rank if 0 <= rank < int(environ["WORLD_SIZE"]) else 0
        if int(environ.get("SLURM_NTASKS", "1")) > 1:
            return int(environ.get("SLURM_PROCID", "0"))
    except ValueError:
        pass
    return 0


def tasks_on_first_node(tasks_per_node: str) -> int:
    """SLURM writes tasks per node as "4", "4(x2)" or "4(x2),3"; the first count is ours to use."""
    match = re.match(r"\d+", tasks_per_node)
    return int(match.group()) if match else 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def choose_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    return requested


def set_threads(requested: int, local_world_size: int, device: torch.device) -> None:
    """Intra-op threads: each process's share of the cores (oversubscribed ranks on a small box
    run far slower), less one on CPU, where the chunk builder thread works beside the step.

    Measured on the 2-core dev machine (configs/ptb-fast.yaml; benchmarks/throughput.md,
    "Threads"): one step thread 509k center words/s quiet and 485k with a core busy elsewhere
    (95%); two threads 768k quiet but 262k busy (34%; 457k with OMP_WAIT_POLICY=PASSIVE).
    """
    check_threads(requested)
    share = core_share(local_world_size)
    threads = requested or (max(1, share - 1) if device.type == "cpu" else share)
    torch.set_num_threads(threads)


def check_threads(requested: int) -> None:
    """More threads than cores only slow the step (1,000 ran 90x slower than 1), and far more
    abort numba's compiler ("LLVM ERROR: Unable to allocate section memory")."""
    cores = usable_cores()
    if requested > cores:
        raise UserError(f"config: train.threads={requested} is more than the {cores} cores "
                        f"this process may use; give at most {cores}, or 0 (auto)")


def core_share(local_world_size: int) -> int:
    """This process's share of the cores, with ``local_world_size`` processes on the node."""
    return max(1, usable_cores() // max(1, local_world_size))


def chunk_builders(env: DistEnv) -> tuple[int, bool]:
    """(threads, in background) for building chunks of examples (data/stream.py).

    On CUDA, and on CPU where the step leaves a core of this process's share free, one
    thread builds the next chunks while the step runs. Where the step's threads take the
    whole share, a build beside them only slows the step down (its parallel loops wait for
    their slowest thread), so builds run in bursts, on the whole share, between steps.
    """
    share = core_share(env.local_world_size)
    if env.device.type == "cuda" or torch.get_num_threads() < share:
        return 1, True
    return share, False


def init_distributed(
    cfg: Config, environ: Mapping[str, str] | None = None, store: dist.Store | None = None
) -> DistEnv:
    """Build this process's DistEnv and, when there are ranks, its process group.

    A process started without a launcher gets no process group (plain single-process training).
    ``store`` lets in-process tests join a group through a FileStore instead of env://.
    """
    environ = os.environ if environ is None else environ
    launch = read_launch_env(environ)
    if store is not None:
        launch = LaunchInfo(launch.rank, launch.local_rank, launch.world_size,
                            launch.local_world_size, "store")
    device = choose_device(cfg.train.device, launch.local_rank)
    set_threads(cfg.train.threads, launch.local_world_size, device)
    if "glibc.malloc" not in environ.get("GLIBC_TUNABLES", ""):  # a user's own settings win
        keep_freed_memory()
    restarts = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")) + int(
        environ.get("SLURM_RESTART_COUNT", "0"))
    if launch.launcher == "none":
        return DistEnv(device=device, restart_count=restarts)
    backend = choose_backend(cfg.dist.backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    if store is None:
        check_rendezvous_address(environ)
        store = join_rendezvous(launch, restarts, timeout, environ)
    dist.init_process_group(backend, store=store, rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout)
    return DistEnv(launch.rank, launch.local_rank, launch.world_size, launch.local_world_size,
                   device, backend, restarts)


def join_rendezvous(launch: LaunchInfo, restarts: int, timeout: datetime.timedelta,
                    environ: Mapping[str, str]) -> dist.Store:
    """The env:// store every rank meets at, keyed per attempt.

    A rank that waits in vain (a rank never started, a wrong MASTER_ADDR) is a launch mistake:
    one line naming the address and dist.timeout_s, not torch's traceback.
    """
    try:
        store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size,
                                           timeout=timeout))
    except dist.DistError as exc:
        address = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        waited = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RankError(
            f"rank {launch.rank} of {launch.world_size} gave up meeting the other ranks at "
            f"{address} after {timeout.total_seconds():g} s ({waited}); start all "
            f"{launch.world_size} ranks with the same MASTER_ADDR and MASTER_PORT, or raise "
            "dist.timeout_s") from None
    # torchrun keeps one TCPStore across worker restarts (--max-restarts), and a restarted
    # group would read the peer addresses the dead attempt left there and dial dead ports
    # ("Connection refused"); a key prefix per attempt gives every attempt clean keys.
    return dist.PrefixStore(f"dist-w2v/attempt-{restarts}", store)


def check_rendezvous_address(environ: Mapping[str, str]) -> None:
    """env:// reads MASTER_ADDR and MASTER_PORT; torchrun always sets them, a hand-set RANK and
    WORLD_SIZE may not, and torch then raises a traceback."""
    if not environ.get("MASTER_ADDR"):
        raise UserError("RANK and WORLD_SIZE are set but MASTER_ADDR is not; launch with "
                        "torchrun, which sets all of them, or unset RANK and WORLD_SIZE to train "
                        "in one process")
    port = environ.get("MASTER_PORT", "")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"MASTER_PORT={port!r} is not a port (1-65535); launch with torchrun, "
                        "which sets it, or set a free port")


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(
    cfg: Config, environ: Mapping[str, str] | None = None, store: dist.Store | None = None
) -> Iterator[DistEnv]:
    """The process group lives exactly as long as this block, also when it raises."""
    env = init_distributed(cfg, environ, store)
    try:
        yield env
        # Leave together: a rank that tears down while a peer still talks to it makes gloo
        # report a closed connection on the peer. Skipped on errors, where a peer may be gone.
        barrier(env)
    finally:
        teardown(env)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (in place) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank when it is true on any rank (failures)."""
    return bool(largest_over_ranks(env, int(flag)))


def largest_over_ranks(env: DistEnv, value: int) -> int:
    """The largest of every rank's ``value`` (|value| < 2**53), on every rank."""
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)  # 53 bits exact
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def same_on_every_rank(env: DistEnv, text: str) -> bool:
    """Whether every rank holds the same ``text`` (compared by a 52-bit digest: a float
    collective carries it exactly, on NCCL as on gloo); the same answer on every rank."""
    key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big") >> 4
    return largest_over_ranks(env, key) == -largest_over_ranks(env, -key)


def on_main_rank(env: DistEnv, action: Callable[[], object]) -> None:
    """Run ``action`` on rank 0 only; every rank returns after it, or raises its UserError.

    A plain barrier would leave the other ranks waiting forever when rank 0 fails; the outcome
    travels through a collective instead, and every rank stops with the same one-line error.
    """
    _on_some_ranks(env, env.is_main, action)


def on_node_main(env: DistEnv, action: Callable[[], object]) -> None:
    """Like :func:`on_main_rank`, on the first process of every node (local rank 0): for
    node-local work such as filling a cache that other nodes may not share."""
    _on_some_ranks(env, env.local_rank == 0, action)


def _on_some_ranks(env: DistEnv, chosen: bool, action: Callable[[], object]) -> None:
    error: UserError | None = None
    if chosen:
        try:
            action()
        except UserError as exc:
            error = exc
    if any_rank(env, error is not None):
        raise error or UserError("another rank failed to prepare the run; see its log")
