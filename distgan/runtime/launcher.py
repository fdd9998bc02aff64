"""`distgan-launch ARGS` (or `distgan launch ARGS`): `accelerate launch ARGS`, made safe
to stop. Use it where you would use `accelerate launch`, with the same arguments.

`accelerate launch` itself dies on SIGUSR1 and leaves its trainers running, answers Ctrl-C,
SIGTERM and SIGHUP by passing the signal on with 30 s to finish, and then reports the signal as a
failure with a traceback. This launcher runs it in a session of its own, with the stop signals
ignored, and passes each stop signal it gets (SIGUSR1, SIGTERM, SIGINT, SIGHUP) to the trainers
themselves. They finish their step, agree on it, write one checkpoint and exit 0, and so does
the launcher; the same command resumes. A second Ctrl-C kills everything at once. If this
launcher is killed, even by SIGKILL, `accelerate launch` dies with it and each trainer notices
(training/trainer.py): they checkpoint and exit the same way. A signal sent to every process of the
job (as SLURM does) reaches only the trainers and this launcher: `accelerate launch` ignores it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from distgan.runtime.signals import STOP_SIGNALS, adopt_orphans, catches, die_with_parent, ignored

POLL_SECONDS = 0.2
READY_SIGNAL = signal.SIGTERM  # a trainer that catches it has all its stop handlers (train.py)


def _child_setup() -> None:
    """In `accelerate launch`, before it starts: the stop signals ignored, so that one sent to
    every process (SLURM does) reaches only the trainers, which install their own handlers; and
    killed with this launcher, whose trainers then stop by themselves (train.py)."""
    for stop_signal in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


class Launcher:
    """`accelerate launch` as a child, the trainers under it, and the stop asked for."""

    def __init__(self, argv: list[str]):
        self.requested: int | None = None
        self.told: set[int] = set()
        for stop_signal in STOP_SIGNALS:
            if not (stop_signal == signal.SIGHUP and ignored(stop_signal)):  # nohup
                signal.signal(stop_signal, self._received)
        adopt_orphans()  # a trainer whose launcher died is still waited for
        command = [sys.executable, "-m", "accelerate.commands.launch", *argv]
        # Torch elastic would catch SIGTERM/SIGINT/SIGHUP itself, pass them on with 30 s to
        # finish, then SIGKILL: its --signals-to-handle (read from PET_*) leaves them alone.
        env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGQUIT"}
        self.child = subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=_child_setup
        )

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

    def orphans(self) -> list[psutil.Process]:
        """Trainers adopted after `accelerate launch` died."""
        with contextlib.suppress(psutil.Error):
            return [p for p in psutil.Process().children() if p.pid != self.child.pid]
        return []

    def trainers(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [*psutil.Process(self.child.pid).children(), *self.orphans()]
        return self.orphans()

    def pass_on(self) -> None:
        """The requested stop, to each trainer once, as soon as it has its handlers."""
        for trainer in self.trainers():
            if trainer.pid in self.told or not catches(trainer.pid, READY_SIGNAL):
                continue
            # A trainer started under nohup ignores SIGHUP: SIGTERM asks it the same.
            signum = self.requested if catches(trainer.pid, self.requested) else READY_SIGNAL
            with contextlib.suppress(ProcessLookupError):
                os.kill(trainer.pid, signum)
            self.told.add(trainer.pid)

    def kill_all(self) -> None:
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(self.child.pid)
            for process in [*tree.children(recursive=True), tree, *self.orphans()]:
                with contextlib.suppress(psutil.Error):
                    process.kill()

    def wait(self) -> int:
        """The status of `accelerate launch`, once it and every adopted trainer are done."""
        while self.child.poll() is None or self.orphans():
            if self.requested is not None:
                self.pass_on()
            for orphan in self.orphans():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(orphan.pid, os.WNOHANG)  # reap it once it has exited
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
