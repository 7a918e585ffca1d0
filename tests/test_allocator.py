"""glibc's malloc policy for training processes (dist_w2v/parallel/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from dist_w2v.config import load_config
from dist_w2v.parallel import env

# A fresh interpreter: the test process's own allocator may already have been set by a trainer.
FREE_A_STEP_SIZED_BLOCK = """
import ctypes, os
from dist_w2v.parallel.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 40 * 2**20  # about one CPU step's temporaries at B=8192

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def kept_after_free():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    before = resident()
    libc.free(block)
    return before - resident() < SIZE // 2

print(kept_after_free(), keep_freed_memory(), kept_after_free())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_step_sized_block_stays_with_the_process_once_the_policy_is_set():
    """By default glibc unmaps a freed 40 MiB block (the next step faults its pages in again);
    with the policy the pages stay for the next allocation."""
    result = subprocess.run([sys.executable, "-c", FREE_A_STEP_SIZED_BLOCK],
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "True"]


@pytest.mark.parametrize("tunables, applied", [
    ("", True), ("glibc.pthread.rseq=0", True), ("glibc.malloc.mmap_threshold=131072", False)])
def test_a_training_process_sets_the_policy_unless_the_user_tuned_malloc(monkeypatch, tunables,
                                                                         applied):
    calls = []
    monkeypatch.setattr(env, "keep_freed_memory", lambda: calls.append(True))
    threads = torch.get_num_threads()
    try:
        env.init_distributed(load_config(None, ["train.device=cpu", "train.threads=1"]),
                             {"GLIBC_TUNABLES": tunables})
    finally:
        torch.set_num_threads(threads)
    assert calls == ([True] if applied else [])
