"""How many cores this process may use: without torch, so light commands (prepare) start fast."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: a SLURM or cgroup CPU set, not the whole machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
