"""The signals that stop a run, shared by the trainer and `distgan-launch`. Imports no torch.

SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, or a launcher stopping
its workers), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) all ask for the same thing: finish
the step, agree on it, checkpoint, exit 0.
"""

from __future__ import annotations

import ctypes
import signal
import sys

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(option, value)


def die_with_parent(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (even by SIGKILL)."""
    _prctl(PR_SET_PDEATHSIG, signum)


def adopt_orphans() -> None:
    """Become the parent of any descendant whose own parent dies, so that it can be waited for."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def ignored(signum: int) -> bool:
    """Whether `signum` was ignored when this process started (nohup ignores SIGHUP): a closed
    terminal is then meant to change nothing."""
    return signal.getsignal(signum) == signal.SIG_IGN


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler of its own for `signum` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)
