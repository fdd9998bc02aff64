"""Machine facts: CPUs and memory within cgroup (v1 and v2) and affinity limits, GPUs that are
visible to a job whose torch cannot use them (a one-line error, also from the trainer), two DALI
builds installed at once, and `python -m distgan.runtime.env`."""

import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distgan.errors import UserError
from distgan.runtime import env
from tests.helpers import REPO, gpus_of_this_machine, run_train

GIB = 2**30


def cgroup_v2(root: Path, path: str, files: dict[str, str]) -> Path:
    """A cgroup v2 tree with this process in `path` and `files` in its folder."""
    folder = root / "fs" / path.lstrip("/")
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    (root / "cgroup").write_text(f"0::{path}\n")
    return root / "fs"


def test_cgroup_v2_limits_memory_and_cpus(tmp_path):
    files = {
        "memory.max": str(16 * GIB),
        "memory.current": str(6 * GIB),
        "memory.stat": f"anon 1\ninactive_file {2 * GIB}\n",
        "cpu.max": "350000 100000",
    }
    fs = cgroup_v2(tmp_path, "/slurm/job_7/step_0", files)
    (fs / "slurm" / "memory.max").write_text(str(64 * GIB))  # a looser ancestor
    proc = tmp_path / "cgroup"
    # 16 GiB allowed, 6 used of which 2 are droppable page cache: 12 GiB left.
    assert env.cgroup_memory_headroom(fs, proc) == 12 * GIB
    assert env.cgroup_cpu_limit(fs, proc) == 4  # 3.5 CPUs of quota round up
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {512 * 2**20} kB\nMemAvailable: {400 * 2**20} kB\n")
    assert env.available_memory(fs, proc, meminfo) == 12 * GIB  # the job's limit, not the node's
    (fs / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max")
    assert env.available_memory(fs, proc, meminfo) == 64 * GIB  # the ancestor's limit holds
    (fs / "slurm" / "memory.max").write_text("max")
    assert env.available_memory(fs, proc, meminfo) == 400 * GIB  # no limit: the machine's


def test_cgroup_v1_memory_and_cpu_limits(tmp_path):
    folder = tmp_path / "fs" / "memory" / "job"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(str(8 * GIB))
    (folder / "memory.usage_in_bytes").write_text(str(3 * GIB))
    (folder / "memory.stat").write_text(f"total_inactive_file {GIB}\n")
    (tmp_path / "fs" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    cpu = tmp_path / "fs" / "cpu,cpuacct" / "job"  # the usual co-mounted v1 controllers
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("600000")
    (cpu / "cpu.cfs_period_us").write_text("100000")
    (tmp_path / "cgroup").write_text("4:memory:/job\n3:cpu,cpuacct:/job\n0::/\n")
    assert env.cgroup_memory_headroom(tmp_path / "fs", tmp_path / "cgroup") == 6 * GIB
    assert env.cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") == 6


def test_cpus_follow_the_affinity(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert env.available_cpus(tmp_path, tmp_path / "none") == 3


@pytest.mark.parametrize(
    "environ, devices, expected",
    [
        ({}, [], None),
        ({}, ["nvidia0", "nvidiactl"], "nvidia0"),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, [], "CUDA_VISIBLE_DEVICES=0,1"),
        ({"CUDA_VISIBLE_DEVICES": ""}, ["nvidia0"], None),  # hidden on purpose
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8"}, [], "SLURM_GPUS_ON_NODE=8"),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, ["nvidia0"], None),
        ({"SLURM_JOB_ID": "7"}, ["nvidia0"], None),  # a CPU job on a GPU node
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0"}, [], "SLURM_JOB_GPUS=0"),  # GPU index 0
    ],
)
def test_visible_gpus(tmp_path, environ, devices, expected):
    for name in devices:
        (tmp_path / name).touch()
    found = env.visible_gpus(environ, tmp_path)
    assert found == expected or (expected and found and found.endswith(expected))


def test_gpus_without_cuda_in_torch_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (tmp_path / "nvidia0").touch()
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19\n")
    with pytest.raises(UserError) as caught:
        env.require_usable_cuda({}, tmp_path, driver)
    message = str(caught.value)
    assert "\n" not in message and "nvidia0" in message
    assert "needs NVIDIA driver >= 580 (found 535.104.05)" in message
    assert "CUDA 12 clusters" in message and "CUDA_VISIBLE_DEVICES=" in message
    env.require_usable_cuda({"CUDA_VISIBLE_DEVICES": ""}, tmp_path, driver)  # CPU on purpose


def test_two_dali_builds_are_refused():
    env.require_one_dali_build(["nvidia-dali-cuda130 2.4.0"])
    with pytest.raises(UserError, match="pip uninstall -y nvidia-dali-cuda120 nvidia-dali-cuda130"):
        env.require_one_dali_build(["nvidia-dali-cuda120 2.4.0", "nvidia-dali-cuda130 2.4.0"])


def test_installed_dali_builds_are_found(monkeypatch):
    def dist(name, version):
        return SimpleNamespace(metadata={"Name": name}, version=version)

    found = [
        dist("numpy", "2.4"),
        dist("nvidia-dali-cuda130", "2.4.0"),
        dist("nvidia-dali-cuda120", "2.3.0"),
    ]
    monkeypatch.setattr(env.importlib.metadata, "distributions", lambda: found)
    assert env.dali_builds() == ["nvidia-dali-cuda120 2.3.0", "nvidia-dali-cuda130 2.4.0"]
    with pytest.raises(UserError, match="2 DALI builds are installed"):
        env.require_one_dali_build()


@pytest.mark.skipif(
    gpus_of_this_machine() is not None, reason="shows a CPU machine's report; this one has GPUs"
)
def test_env_report_and_the_trainer_refuse_hidden_gpus(tmp_path):
    command = [sys.executable, "-m", "distgan.runtime.env"]
    ok = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "torch " in ok.stdout and "DALI: nvidia-dali-cuda" in ok.stdout
    assert "onnxruntime" in ok.stdout and ok.stdout.strip().endswith(
        "ok: training will use what is found above"
    )
    gpu_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    bad = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=gpu_env)
    assert (
        bad.returncode == 1 and "problem: GPUs are visible (CUDA_VISIBLE_DEVICES=0)" in bad.stdout
    )
    result = run_train(
        "--out-dir", tmp_path / "run", "--max-steps", "1", env={"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: GPUs are visible (CUDA_VISIBLE_DEVICES=0) but torch cannot use CUDA"
    )
    assert not (tmp_path / "run").exists()  # stopped before any work


@pytest.mark.parametrize("cuda, dali", [(None, "cuda130"), ("13", "cuda130"), ("12", "cuda120")])
def test_install_asks_for_exactly_one_dali_build(monkeypatch, cuda, dali):
    import setuptools

    asked = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: asked.update(kwargs))
    if cuda is None:
        monkeypatch.delenv("DISTGAN_CUDA", raising=False)
    else:
        monkeypatch.setenv("DISTGAN_CUDA", cuda)
    runpy.run_path(str(REPO / "setup.py"))
    builds = [r for r in asked["install_requires"] if r.startswith("nvidia-dali")]
    assert builds == [f"nvidia-dali-{dali}>=2.4,<3"]
    monkeypatch.setenv("DISTGAN_CUDA", "11")
    with pytest.raises(SystemExit, match="use 13 \\(the default\\) or 12"):
        runpy.run_path(str(REPO / "setup.py"))
