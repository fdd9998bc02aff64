"""`distgan-launch ARGS` (or `python -m distgan.launcher ARGS`): `accelerate launch ARGS`, made safe
to stop. Use it where you would use `accelerate launch`, with the same arguments.

`accelerate launch` itself dies on SIGUSR1 and leaves its trainers running, answers Ctrl-C,
SIGTERM and SIGHUP by passing the signal on with 30 s to finish, and then reports the signal as a
failure with a traceback. This launcher runs it in a session of its own, with SIGUSR1 ignored,
and passes each stop signal it gets (SIGUSR1, SIGTERM, SIGINT, SIGHUP) to the trainers
themselves. They finish their step, agree on it, write one checkpoint and exit 0, and so does
the launcher; the same command resumes. A second Ctrl-C kills everything at once. If this
launcher is killed, even by SIGKILL, `accelerate launch` gets SIGTERM and the trainers stop the
same way; if `accelerate launch` dies, each trainer notices (distgan/train.py) and stops too.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time

import psutil

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_SECONDS = 0.2


def _child_setup() -> None:
    """In `accelerate launch`, before it starts: SIGUSR1 ignored (its trainers install their own
    handler), and SIGTERM when this launcher dies."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (a trainer that is ready to stop)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


class Launcher:
    """`accelerate launch` as a child, and the stop signals this process has received."""

    def __init__(self, argv: list[str]):
        command = [sys.executable, "-m", "accelerate.commands.launch", *argv]
        self.child = subprocess.Popen(command, start_new_session=True, preexec_fn=_child_setup)
        self.requested: int | None = None
        self.told: set[int] = set()
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, self._received)

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            self.kill_all()  # a second Ctrl-C: now
            print("distgan-launch: interrupted twice: stopped at once", file=sys.stderr)
            sys.exit(130)
        if self.requested is None:
            self.requested = signum
            name = signal.Signals(signum).name
            then = "the trainers finish their step and checkpoint (Ctrl-C again: stop at once)"
            print(f"distgan-launch: {name}: {then}", file=sys.stderr, flush=True)

    def trainers(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.child.pid).children()
        return []

    def pass_on(self) -> None:
        """The requested stop, to each trainer once, as soon as it has its handler."""
        for trainer in self.trainers():
            if trainer.pid not in self.told and catches(trainer.pid, self.requested):
                with contextlib.suppress(ProcessLookupError):
                    trainer.send_signal(self.requested)
                self.told.add(trainer.pid)

    def kill_all(self) -> None:
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(self.child.pid)
            for process in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.Error):
                    process.kill()

    def wait(self) -> int:
        while self.child.poll() is None:
            if self.requested is not None:
                self.pass_on()
            time.sleep(POLL_SECONDS)
        code = self.child.returncode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    sys.exit(Launcher(argv).wait())


if __name__ == "__main__":
    main()
