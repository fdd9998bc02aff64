"""One trainer per run folder (distgan/outputs/runlock.py), with real second processes holding the lock:
a second trainer is refused with the holder's host, pid and start time; the lock goes when its
holder exits or is killed (SIGKILL); without flock, a live holder's heartbeat keeps it, and a
holder whose heartbeat stopped (a dead node) is taken over after the timeout, and stops if it
wakes up; a SLURM requeue takes over from its own earlier attempt at once. End to end: a second
`launch/train.py` on a folder in use stops at once, and resumes the run once the first is killed."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from distgan.config.flags import parse_args
from distgan.errors import UserError
from distgan.outputs.checkpoint import list_checkpoints, read_trainer_state
from distgan.outputs.runlock import (
    BEAT_THREAD,
    LOCK_FILE,
    LOST_EXIT_STATUS,
    Holder,
    RunLock,
    read_holder,
)
from distgan.training import trainer as train_module
from tests.helpers import REPO, run_train, small_run

# A holder in its own process; it exits (releasing the lock) when its stdin closes, and checks
# its lock as before a checkpoint on each line "check".
HOLD = """
import socket, sys, time
from distgan.outputs.runlock import RunLock
folder, timeout, flock, host = sys.argv[1:]
if host:
    socket.gethostname = lambda: host  # as if on another node
lock = RunLock(folder, timeout=float(timeout), use_flock=flock == "flock")
lock.acquire()
print("held", flush=True)
for line in sys.stdin:
    lock.ensure_held()
    print("still held", flush=True)
"""


def hold(folder, *, timeout=300.0, flock=True, host="", slurm=None) -> subprocess.Popen:
    """A process holding `folder`'s lock, once this returns."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | (slurm or {})
    args = [str(folder), str(timeout), "flock" if flock else "none", host]
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert process.stdout.readline() == "held\n", process.communicate()[1]
    return process


def lock(folder, said: list | None = None, environ=None, **options) -> RunLock:
    """A RunLock of this process, outside any SLURM job unless `environ` says so."""
    say = said.append if said is not None else print
    return RunLock(folder, environ=environ or {}, say=say, **options)


def test_a_second_trainer_is_refused_naming_the_first(tmp_path):
    holder = hold(tmp_path)
    with pytest.raises(UserError) as refused:
        lock(tmp_path).acquire()
    message = str(refused.value)
    assert message.startswith(f"another trainer is using {tmp_path}: host {socket.gethostname()}")
    assert f"pid {holder.pid}, started 20" in message and "\n" not in message
    assert "--out-dir" in message
    holder.stdin.close()  # it exits normally: the lock goes with it
    assert holder.wait(10) == 0
    assert not (tmp_path / LOCK_FILE).exists()
    said = []
    mine = lock(tmp_path, said)
    mine.acquire()
    assert said == [] and read_holder(tmp_path / LOCK_FILE).pid == os.getpid()
    mine.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_goes_when_its_holder_is_killed(tmp_path):
    holder = hold(tmp_path)
    holder.kill()  # SIGKILL: no atexit, the file stays; the kernel drops the flock
    holder.wait()
    said = []
    mine = lock(tmp_path, said)
    mine.acquire()
    assert len(said) == 1 and said[0].startswith(f"note: took over {tmp_path / LOCK_FILE} from")
    assert f"pid {holder.pid}" in said[0] and said[0].endswith("it no longer runs")
    mine.release()


def test_without_flock_a_stale_heartbeat_is_taken_over_after_the_timeout(tmp_path):
    # The holder is "on another node", where only its heartbeat tells whether it lives.
    holder = hold(tmp_path, timeout=1.0, flock=False, host="node-a")
    time.sleep(1.5)  # past the timeout: only the heartbeat keeps the lock
    record = read_holder(tmp_path / LOCK_FILE)
    assert record.host == "node-a" and record.heartbeat > record.started + 1
    with pytest.raises(UserError, match="host node-a") as refused:
        lock(tmp_path, timeout=1.0, use_flock=False).acquire()
    assert "taken over once its heartbeat is 1 s old (DISTGAN_LOCK_TIMEOUT)" in str(refused.value)

    holder.send_signal(signal.SIGSTOP)  # its node hangs: no more heartbeats
    time.sleep(1.5)
    said = []
    mine = lock(tmp_path, said, timeout=1.0, use_flock=False)
    mine.acquire()
    assert len(said) == 1 and "from host node-a" in said[0]
    assert "its heartbeat stopped" in said[0] and "(DISTGAN_LOCK_TIMEOUT=1)" in said[0]

    holder.send_signal(signal.SIGCONT)  # it wakes up, finds its lock taken and stops
    assert holder.wait(10) == LOST_EXIT_STATUS
    lost = holder.stderr.read().strip()
    assert lost.startswith(f"error: the lock of {tmp_path} was taken over by host ")
    assert f"pid {os.getpid()}" in lost and lost.endswith("writing nothing more")
    assert read_holder(tmp_path / LOCK_FILE).pid == os.getpid()  # the holder wrote nothing
    mine.release()


def test_a_holder_whose_lock_is_taken_over_on_another_node_stops(tmp_path):
    # flock works within each node only: the holder (on node-a) holds none that this node sees.
    holder = hold(tmp_path, timeout=1.0, flock=False, host="node-a")
    holder.send_signal(signal.SIGSTOP)  # its node hangs: no more heartbeats
    time.sleep(1.5)
    said = []
    mine = lock(tmp_path, said, timeout=1.0)  # with flock, which it gets
    try:
        mine.acquire()
        assert len(said) == 1 and "from host node-a" in said[0]
        holder.send_signal(signal.SIGCONT)  # it wakes up, finds its lock taken and stops
        assert holder.wait(10) == LOST_EXIT_STATUS
        assert f"taken over by host {socket.gethostname()}, pid {os.getpid()}" in (
            holder.stderr.read()
        )
        time.sleep(0.3)  # heartbeats of this trainer: its record stays its own
        assert read_holder(tmp_path / LOCK_FILE).pid == os.getpid()
    finally:
        holder.kill()
        mine.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_checks_its_lock_before_a_checkpoint(tmp_path):
    holder = hold(tmp_path)  # its first heartbeat only after 30 s
    holder.stdin.write("check\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "still held\n"
    # Another trainer's record in the same file (as a takeover before distgan replaced the file)
    path = tmp_path / LOCK_FILE
    other = Holder(host="node-b", pid=4242, started=time.time(), heartbeat=time.time())
    with open(path, "r+b") as f:
        f.write(other.to_bytes())
    holder.stdin.write("check\n")
    holder.stdin.flush()
    assert holder.wait(10) == LOST_EXIT_STATUS
    assert holder.stdout.read() == ""  # stopped at the check
    lost = holder.stderr.read().strip()
    assert lost.startswith(f"error: the lock of {tmp_path} was taken over by host node-b, pid 4242")
    assert read_holder(path).host == "node-b"  # it left the file alone


def test_a_failing_trainer_gives_its_lock_up(tmp_path, monkeypatch):
    def fail(deterministic):
        raise RuntimeError("failed after taking the lock")

    monkeypatch.setattr(train_module.StopRequest, "install", lambda self, under_launcher: None)
    monkeypatch.setattr(train_module, "configure_kernels", fail)
    with pytest.raises(RuntimeError, match="failed after taking the lock"):
        train_module.train(parse_args(["--out-dir", str(tmp_path)]))
    assert not (tmp_path / LOCK_FILE).exists()
    assert BEAT_THREAD not in [thread.name for thread in threading.enumerate()]
    said = []
    again = lock(tmp_path, said)
    again.acquire()
    assert said == []
    again.release()


def test_a_slurm_requeue_takes_over_from_its_earlier_attempt(tmp_path):
    earlier = hold(tmp_path, timeout=1.0, slurm={"SLURM_JOB_ID": "77"})
    for other in ({"SLURM_JOB_ID": "78"}, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}):
        with pytest.raises(UserError, match=f"pid {earlier.pid}, started .*, SLURM job 77"):
            lock(tmp_path, environ=other).acquire()
    said = []
    requeued = lock(tmp_path, said, environ={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    requeued.acquire()  # at once, although the earlier attempt still holds its flock
    assert len(said) == 1 and f"pid {earlier.pid}" in said[0]
    assert said[0].endswith("an earlier attempt of SLURM job 77, which SLURM ends on requeue")
    assert earlier.wait(10) == LOST_EXIT_STATUS  # had SLURM not ended it, it stops itself
    assert "SLURM job 77 (attempt 2)" in earlier.stderr.read()
    requeued.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_timeout_is_checked(tmp_path):
    with pytest.raises(UserError, match="DISTGAN_LOCK_TIMEOUT='soon' is not a number"):
        RunLock(tmp_path, environ={"DISTGAN_LOCK_TIMEOUT": "soon"})
    assert RunLock(tmp_path, environ={"DISTGAN_LOCK_TIMEOUT": "20"}).timeout == 20


@pytest.mark.slow
def test_a_second_trainer_on_a_run_folder_stops_at_once(tmp_path, faces_cache):
    out = tmp_path / "run"
    flags = small_run(out, faces_cache, "--max-steps", "5000", "--sample-every", "5000")
    first = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), *map(str, flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert any(line.startswith("distgan:") for line in first.stdout)  # training
        second = run_train(*flags)
        assert second.returncode == 2 and "distgan:" not in second.stdout
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: another trainer is using {out}: host ")
        assert f"pid {first.pid}, started " in line
        deadline = time.monotonic() + 300
        while not list_checkpoints(out / "checkpoints"):  # one to resume from
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
    finally:
        first.kill()  # SIGKILL: the lock goes with it
        first.wait()
    reached = read_trainer_state(list_checkpoints(out / "checkpoints")[-1]).step
    again = run_train(*small_run(out, faces_cache, "--max-steps", reached + 5))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"steps {reached} -> {reached + 5}" in again.stdout
    assert f"from host {socket.gethostname()}, pid {first.pid}" in again.stdout
    assert "it no longer runs" in again.stdout
    assert not (out / LOCK_FILE).exists()
