"""Stopping a run as users do, with 2 real processes: SIGUSR1, SIGTERM, SIGINT and SIGHUP sent to
`distgan-launch`, to one trainer or to every process of the job each end with one checkpoint at
a step all processes agreed on, exit status 0 and one line saying where it stopped; a second Ctrl-C stops at once; a killed
launcher (SIGKILL) or a dead `accelerate launch` leaves no trainer behind, and they checkpoint
first. After every case no process of the job is left. A single process stops the same way."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import REPO, free_port, small_run

pytestmark = pytest.mark.slow

LAUNCH_FLAGS = ["--mixed_precision", "no", "--dynamo_backend", "no"]
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start(out, faces_cache, launcher: list[str], processes: int = 2) -> subprocess.Popen:
    """A long run under `launcher`, in its own session as a terminal would start it."""
    flags = small_run(out, faces_cache, "--max-steps", "5000", "--ckpt-every", "5000")
    multi = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else []
    port = ["--main_process_port", str(free_port())]
    command = [*launcher, *multi, *LAUNCH_FLAGS, *port, str(REPO / "launch" / "train.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A session of its own, as a terminal starts a job: signals reach only whom they are sent to;
    # and the stop signals at their defaults, whatever this test run inherited (under nohup,
    # SIGHUP is ignored, and distgan keeps it so by design).
    session = {"start_new_session": True, "preexec_fn": default_stop_signals}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([*command, *map(str, flags)], cwd=REPO, env=env, **session, **pipes)


def default_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def is_trainer(process: psutil.Process) -> bool:
    """A trainer runs `python [-u] launch/train.py`; a launcher names the script further on."""
    try:
        return any(arg.endswith("launch/train.py") for arg in process.cmdline()[1:3])
    except psutil.Error:  # gone, or a zombie a moment before it is reaped
        return False


def trainers_running(job: subprocess.Popen, out, count: int) -> list[psutil.Process]:
    """Wait until the run has logged a few steps; return every process of the job."""
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        tree = psutil.Process(job.pid).children(recursive=True)
        trainers = [p for p in tree if is_trainer(p)]
        logged = metrics.exists() and len(metrics.read_text().splitlines()) >= 2
        if len(trainers) >= count and logged:
            return [psutil.Process(job.pid), *tree]
        assert job.poll() is None, job.communicate()[1][-3000:]
        time.sleep(0.3)
    raise AssertionError("the run did not start logging in 120 s")


def assert_none_left(processes: list[psutil.Process], timeout: float = 60) -> None:
    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.time() + timeout
    alive = processes
    while alive and time.time() < deadline:
        alive = [p for p in alive if running(p)]
        time.sleep(0.2)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not alive, f"left running: {[p.pid for p in alive]}"


def assert_stopped_with_a_checkpoint(out, stdout: str, reason: str) -> int:
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    assert marker["signal"] == reason and step % 5 == 0
    assert f"stopped by {reason} at step {step}: checkpoint written" in stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert not (out / "generator.safetensors").exists()
    return step


def assert_stops_cleanly(job, out, processes: list[psutil.Process], reason: str) -> str:
    """The job exits 0, stopped by `reason` with a checkpoint, and leaves no process; its stderr."""
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    assert_stopped_with_a_checkpoint(out, stdout, reason)
    assert_none_left(processes)
    return stderr


def distgan_launch() -> list[str]:
    return [sys.executable, "-m", "distgan.runtime.launcher"]


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=[s.name for s in STOP_SIGNALS])
def test_a_signal_to_the_launcher_checkpoints_and_exits_0(tmp_path, faces_cache, signum):
    out = tmp_path / "run"
    job = start(out, faces_cache, distgan_launch())
    processes = trainers_running(job, out, 2)
    job.send_signal(signum)
    stderr = assert_stops_cleanly(job, out, processes, signal.Signals(signum).name)
    assert "Traceback" not in stderr


def test_a_signal_to_every_process_checkpoints_and_exits_0(tmp_path, faces_cache):
    # As SLURM preempts a job step: SIGTERM to the launcher, `accelerate launch` and the trainers.
    out = tmp_path / "run"
    job = start(out, faces_cache, distgan_launch())
    processes = trainers_running(job, out, 2)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    stderr = assert_stops_cleanly(job, out, processes, "SIGTERM")
    assert "Traceback" not in stderr


def test_a_signal_to_one_trainer_stops_them_all(tmp_path, faces_cache):
    out = tmp_path / "run"
    job = start(out, faces_cache, distgan_launch())
    processes = trainers_running(job, out, 2)
    rank1 = next(p for p in processes if is_trainer(p) and p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    # The main process did not get the signal: it stopped on the agreed step all the same.
    assert_stops_cleanly(job, out, processes, "a signal to another process")


def test_a_second_ctrl_c_stops_at_once(tmp_path, faces_cache):
    out = tmp_path / "run"
    job = start(out, faces_cache, distgan_launch())
    processes = trainers_running(job, out, 2)
    job.send_signal(signal.SIGINT)
    time.sleep(1)  # two presses, not one signal delivered twice before the handler ran
    job.send_signal(signal.SIGINT)
    started = time.time()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130 and time.time() - started < 20
    assert "interrupted twice: stopped at once" in stderr
    assert_none_left(processes, timeout=20)


def test_a_killed_launcher_leaves_no_trainer_and_they_checkpoint(tmp_path, faces_cache):
    out = tmp_path / "run"
    job = start(out, faces_cache, distgan_launch())
    processes = trainers_running(job, out, 2)
    job.kill()
    job.communicate(timeout=60)
    assert_none_left(processes)
    # `accelerate launch` got SIGTERM from the kernel and passed it on to the trainers.
    marker = json.loads((out / "preempted.json").read_text())
    assert (out / "checkpoints" / f"step-{marker['step']:08d}" / "trainer_state.json").is_file()


def test_a_dead_accelerate_launch_leaves_no_trainer_and_they_checkpoint(tmp_path, faces_cache):
    out = tmp_path / "run"
    # `accelerate launch` itself dies of SIGUSR1 (its default action): each trainer is told by
    # the kernel that its parent is gone, and they stop together with a checkpoint.
    job = start(out, faces_cache, [sys.executable, "-m", "accelerate.commands.launch"])
    processes = trainers_running(job, out, 2)
    job.send_signal(signal.SIGUSR1)
    stdout, _ = job.communicate(timeout=120)
    assert job.returncode == -signal.SIGUSR1
    assert_none_left(processes)
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["signal"] == "the launcher's exit"
    assert (out / "checkpoints" / f"step-{marker['step']:08d}" / "trainer_state.json").is_file()


@pytest.mark.parametrize("signum", STOP_SIGNALS[2:], ids=[s.name for s in STOP_SIGNALS[2:]])
def test_one_process_stops_the_same_way(tmp_path, faces_cache, signum):
    out = tmp_path / "run"
    job = start(out, faces_cache, [sys.executable, "-m", "accelerate.commands.launch"], 1)
    processes = trainers_running(job, out, 1)
    trainer = next(p for p in processes if is_trainer(p))
    trainer.send_signal(signum)
    assert_stops_cleanly(job, out, processes, signal.Signals(signum).name)
