"""Distributed training on CPU with real processes (gloo), as users launch it: 2 processes under
`accelerate launch` end with bitwise identical weights and one checkpoint; DALI shards are
disjoint; ADA's p moves by the real logits of both processes; two "machines" on loopback train
together; resume under 2 processes matches an uninterrupted run; SIGUSR1 checkpoints and exits
cleanly, and the relaunch resumes; a failing process ends the whole job quickly and is named."""

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, SMALL_GAN, free_port, run_train, small_run, write_images

pytestmark = pytest.mark.slow


def launcher(processes=2, machines=1, rank=0, port=None):
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--num_machines", str(machines), "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if machines > 1:
        command += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    return command


small_run = functools.partial(small_run, sample_every=100)


def test_two_processes_end_identical_with_one_checkpoint(tmp_path, faces_cache):
    out = tmp_path / "ddp"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "20"), launcher=launcher())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "batch 8/process (global 16)" in result.stdout
    assert "weights identical on all 2 processes (G, D, EMA G)" in result.stdout
    assert result.stdout.count("done: step 20") == 1  # only the main process prints
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000010", "step-00000020"]  # no staging leftovers
    step20 = out / "checkpoints" / "step-00000020"
    rng_files = sorted(p.name for p in step20.glob("random_states_*"))
    assert rng_files == ["random_states_0.pkl", "random_states_1.pkl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in records] == [80, 160, 240, 320]  # global batch 16


def test_ada_p_moves_by_the_real_logits_of_both_processes(tmp_path):
    write_images(tmp_path / "eight", 8)
    out = tmp_path / "ada"
    flags = ["--out-dir", out, "--data-dir", tmp_path / "eight", *SMALL_GAN, "--max-steps", "20"]
    flags += ["--log-every", "5", "--sample-every", "100", "--augment", "ada", "--ada-kimg", "0.5"]
    result = run_train(*flags, launcher=launcher())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 processes" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    p = [0.0, *(r["aug_p"] for r in records)]
    # Each log line, p moves by 5 steps x 8 images x 2 processes / 500 (or stays at 0).
    moves = [round(b - a, 6) for a, b in zip(p, p[1:], strict=False)]
    assert all(abs(move) == 0.16 or b == 0 for move, b in zip(moves, p[1:], strict=True)), p
    assert p[-1] > 0, p


def test_dali_shards_are_disjoint_across_processes(tmp_path):
    write_images(tmp_path / "images", 24)  # whole global batches (padding is tested in test_data)
    script = REPO / "tests" / "scripts" / "shard_check.py"
    command = [*launcher(), str(script), str(tmp_path / "images")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "counts [12, 12]" in result.stdout  # the same number of steps on both
    assert "disjoint and complete" in result.stdout


def test_two_machines_on_loopback_train_together(tmp_path, faces_cache):
    out, port = tmp_path / "two-machines", free_port()
    args = small_run(out, faces_cache, "--max-steps", "10")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    trainer = [str(REPO / "launch" / "train.py"), *map(str, args)]
    machines = [
        subprocess.Popen([*launcher(2, 2, rank, port), *trainer], cwd=REPO, env=env, **pipes)
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "2 process(es)" in outputs[0][0]
    assert "weights identical on all 2 processes" in outputs[0][0]
    assert "done: step 10" not in outputs[1][0]  # machine 1 hosts no main process
    assert (out / "generator.safetensors").is_file()


def test_resume_under_two_processes_matches_uninterrupted(tmp_path, faces_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        run_train(
            *small_run(straight, faces_cache, "--max-steps", "20"), launcher=launcher()
        ).returncode
        == 0
    )
    assert (
        run_train(
            *small_run(resumed, faces_cache, "--max-steps", "10"), launcher=launcher()
        ).returncode
        == 0
    )
    again = run_train(*small_run(resumed, faces_cache, "--max-steps", "20"), launcher=launcher())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "steps 10 -> 20" in again.stdout
    step20 = "checkpoints/step-00000020"
    names = (
        "generator.safetensors",
        f"{step20}/model.safetensors",
        f"{step20}/model_1.safetensors",
    )
    for name in names:
        a, b = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def signal_tree(root: psutil.Process, signum) -> None:
    """Signal a launcher and all its descendants, as SLURM signals every process of a step."""
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def test_sigusr1_checkpoints_exits_cleanly_and_resumes(tmp_path, faces_cache):
    out = tmp_path / "preempt"
    args = [
        str(a) for a in small_run(out, faces_cache, "--max-steps", "2000", "--ckpt-every", "1000")
    ]
    command = " ".join([*launcher(), str(REPO / "launch" / "train.py"), *args])
    # As launch/slurm/train.sbatch runs it: the launcher inherits an ignored SIGUSR1.
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    job = subprocess.Popen(["bash", "-c", f"trap '' USR1; exec {command}"], cwd=REPO, **pipes)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 4
    ):
        time.sleep(0.5)
    signal_tree(psutil.Process(job.pid), signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGUSR1" and 20 <= step < 2000
    assert f"stopped by SIGUSR1 at step {step}" in stdout
    assert (out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()
    assert not (out / "generator.safetensors").exists()  # the run is not finished

    resumed = run_train(
        *small_run(out, faces_cache, "--max-steps", str(step + 10)), launcher=launcher()
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {step} -> {step + 10}" in resumed.stdout
    assert not (out / "preempted.json").exists()


def test_a_failing_process_ends_the_job_quickly(tmp_path, faces_cache):
    started = time.time()
    flags = small_run(tmp_path / "fail", faces_cache, "--max-steps", "500")
    fault = {"DISTGAN_INJECT_FAULT": "1:5"}
    result = run_train(*flags, launcher=launcher(), env=fault, timeout=120)
    assert result.returncode != 0
    assert time.time() - started < 60
    assert "error: process 1 failed: RuntimeError: injected fault at step 5" in result.stderr


def test_sync_bn_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --sync-bn is allowed here")
    result = run_train("--sync-bn", "--out-dir", tmp_path / "x", "--max-steps", "1")
    assert result.returncode == 2
    assert "sync_bn needs CUDA GPUs" in result.stderr.strip().splitlines()[-1]


def test_dist_timeout_is_validated():
    command = [sys.executable, "launch/train.py", "--dist-timeout", "0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "dist_timeout=0 is not allowed" in result.stderr
