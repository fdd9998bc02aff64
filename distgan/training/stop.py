"""How a run is asked to stop (signals, the launcher's death) and the faults the tests inject."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from distgan.runtime.files import write_json_atomically
from distgan.runtime.signals import STOP_SIGNALS, die_with_parent, ignored

# Its own signal: the kernel may send it while the dying launcher is still our parent, so the
# signal itself, not getppid(), must say what happened.
PARENT_DEATH_SIGNAL = signal.SIGUSR2

PREEMPTED_MARKER = "preempted.json"


def launched() -> bool:
    """Whether a launcher started this process: `accelerate launch` sets these, plain python not."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_USE_CPU" in os.environ


class StopRequest:
    """Why this process was asked to stop, if it was: one of STOP_SIGNALS, sent to it or passed
    on by the launcher, or the launcher's death. The loop acts on it at the next step that all
    processes agree on; a second Ctrl-C stops at once. A stopped run leaves `marker`, the cue
    for launch/slurm/train.sbatch to requeue the job."""

    def __init__(self, out_dir: Path) -> None:
        self.reason: str | None = None
        self.parent = os.getppid()
        self.marker = Path(os.environ.get("DISTGAN_PREEMPT_MARKER") or out_dir / PREEMPTED_MARKER)

    def install(self, under_launcher: bool) -> None:
        for stop_signal in STOP_SIGNALS:
            if not (stop_signal == signal.SIGHUP and ignored(stop_signal)):  # nohup
                signal.signal(stop_signal, self._received)
        if under_launcher:
            # The kernel signals us when the launcher dies, even by SIGKILL: stop, never orphan.
            signal.signal(PARENT_DEATH_SIGNAL, self._received)
            die_with_parent(PARENT_DEATH_SIGNAL)
            if self._orphaned():  # it died before the request took effect
                self.reason = "the launcher's exit"

    def _orphaned(self) -> bool:
        return os.getppid() != self.parent or self.parent == 1

    def write_marker(self, step: int, stopped_by: str) -> None:
        marker = {"step": step, "signal": stopped_by, "checkpoint": f"step-{step:08d}"}
        write_json_atomically(self.marker, marker)

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.reason is None:
            orphaned = signum == PARENT_DEATH_SIGNAL
            self.reason = "the launcher's exit" if orphaned else signal.Signals(signum).name


@dataclass(kw_only=True)
class Faults:
    """Fault injection for the tests of failure handling, read once from the environment:
    DISTGAN_INJECT_FAULT="RANK:STEP" makes that process raise at that step, and
    DISTGAN_INJECT_NAN="STEP:COUNT" makes the losses of COUNT steps from STEP non-finite, once
    each (a rollback replays those steps cleanly)."""

    raise_at: tuple[int, int] | None = None
    nan_steps: set[int] | None = None

    @classmethod
    def from_env(cls, environ=os.environ) -> Faults:
        fault, nan = environ.get("DISTGAN_INJECT_FAULT"), environ.get("DISTGAN_INJECT_NAN")
        first, count = map(int, nan.split(":")) if nan else (0, 0)
        raise_at = tuple(map(int, fault.split(":"))) if fault else None
        return cls(raise_at=raise_at, nan_steps=set(range(first, first + count)))

    def poison(self, step: int) -> float:
        """The factor on the losses of `step`: NaN once for an injected step, else 1."""
        if self.nan_steps and step in self.nan_steps:
            self.nan_steps.discard(step)
            return float("nan")
        return 1.0

    def check(self, rank: int, step: int) -> None:
        if self.raise_at == (rank, step):
            raise RuntimeError(f"injected fault at step {step} (DISTGAN_INJECT_FAULT)")
