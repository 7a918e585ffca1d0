"""Lines on stdout, and what becomes of them when stdout cannot take them.

Two cases, told apart by the error: a reader that left early (``dist-w2v eval | head``, a
BrokenPipeError) is no mistake, and the CLI ends quietly; a stdout that cannot be written (a
full disk behind ``> file``) is a one-line error for a command's output, and for a training
run's log the end of its console copy (metrics.jsonl keeps every record).
"""

from __future__ import annotations

import contextlib
import os
import sys

from dist_w2v.errors import UserError


def print_out(text: str) -> None:
    """A command's output (similar, eval, export, bench); a failed write is a UserError."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        detach_stdout()
        raise UserError(f"cannot write the output to stdout ({exc.strerror or exc}); free space "
                        "where it goes, or send it elsewhere") from None


def detach_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that what its buffer still holds is
    dropped at exit instead of failing again there ("Exception ignored", exit status 120)."""
    with contextlib.suppress(OSError, ValueError):  # no descriptor: nothing flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
