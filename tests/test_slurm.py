"""SLURM, for real: a one-node cluster (slurmctld + slurmd + munged) on localhost runs the
project's own launch/slurm/train.sbatch with 2 CPU processes. A job trains to the end; a job
warned with SIGUSR1 (as before its time limit) checkpoints, requeues itself and resumes; a job
requeued by `scontrol requeue` mid-run resumes from its checkpoint."""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged", "mungekey")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        pytest.skip(f"Debian's slurm-wlm and munge are not installed (no {', '.join(missing)}); "
                    ".ci/run installs them")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons (munged, slurmd) need root, and this is not root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=distgantest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["mungekey", "--create", f"--keyfile={root}/munge.key"], check=True)
    os.chmod(root / "munge.key", 0o600)
    daemons = [
        subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={root}/munge.key",
                f"--socket={root}/munge.sock",
                f"--pid-file={root}/munged.pid",
                f"--seed-file={root}/munge.seed",
                f"--log-file={root}/log/munged.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    ]
    wait_for(lambda: (root / "munge.sock").exists(), 10)
    for command in (
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf), "-N", host],
    ):
        daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))  # fmt: skip

    def node_idle():
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        return sinfo.stdout.strip() == "idle"

    if not wait_for(node_idle, 60):
        logs = " | ".join(
            f"{p.name}: {p.read_text().strip().splitlines()[-1]}"
            for p in sorted((root / "log").glob("*.log")) if p.read_text().strip()
        )  # fmt: skip
        for daemon in daemons:
            daemon.terminate()
        pytest.skip(f"the one-node SLURM cluster did not come up within 60 s: {logs}")
    yield env
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
    for daemon in reversed(daemons):
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()


def sbatch(
    env, out_dir: Path, log: Path, faces_cache, max_steps: int, ckpt_every: int = 1000
) -> str:
    train_args = [
        "--out-dir", out_dir, "--cache-dir", faces_cache, "--builtin-faces", "240",
        "--resolution", "32", "--g-channels", "16", "--d-channels", "16", "--batch-size", "8",
        "--log-every", "5", "--sample-every", "1000", "--ckpt-every", ckpt_every,
        "--max-steps", max_steps,
    ]  # fmt: skip
    result = subprocess.run(
        ["sbatch", "--parsable", "--export=ALL,DISTGAN_PROCS_PER_NODE=2", f"--output={log}",
         "launch/slurm/train.sbatch", *map(str, train_args)],
        env=env, capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str | None:
    shown = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    )
    match = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return match.group(1) if match else None


def wait_until_done(env, job: str, timeout: float = 300) -> str:
    done = wait_for(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                    timeout, every=1)  # fmt: skip
    assert done, f"job {job} still {job_field(env, job, 'JobState')} after {timeout} s"
    return job_field(env, job, "JobState")


def wait_for_steps(metrics: Path, lines: int) -> None:
    assert wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= lines, 180
    )


def start_requeued_job_now(env, job: str) -> None:
    """SLURM holds a requeued job for a while (BeginTime); a test need not wait for that."""
    assert wait_for(lambda: job_field(env, job, "Restarts") == "1"
                    and job_field(env, job, "JobState") == "PENDING", 120)  # fmt: skip
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def test_sbatch_trains_to_the_end(cluster, tmp_path, faces_cache):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(cluster, out, log, faces_cache, max_steps=30)
    assert wait_until_done(cluster, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"distgan: job {job} (restart 0)" in text and "2 processes, 2 per node" in text
    assert "weights identical on all 2 processes" in text and "done: step 30" in text
    assert (out / "generator.safetensors").is_file()
    assert (out / "checkpoints" / "step-00000030").is_dir()


def test_sigusr1_before_the_time_limit_checkpoints_requeues_and_resumes(
    cluster, tmp_path, faces_cache
):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(cluster, out, log, faces_cache, max_steps=400)
    wait_for_steps(out / "metrics.jsonl", 4)
    subprocess.run(
        ["scancel", "--signal=USR1", job], env=cluster, check=True
    )  # as --signal=USR1@120
    start_requeued_job_now(cluster, job)
    assert wait_until_done(cluster, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+)", text).group(1))
    assert f"requeueing job {job}" in text and f"distgan: job {job} (restart 1)" in text
    assert f"steps {stopped} -> 400" in text and "done: step 400" in text
    assert (out / "generator.safetensors").is_file()


def test_scontrol_requeue_mid_run_resumes(cluster, tmp_path, faces_cache):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(cluster, out, log, faces_cache, max_steps=400, ckpt_every=20)
    wait_for_steps(out / "metrics.jsonl", 6)
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
    start_requeued_job_now(cluster, job)
    assert wait_until_done(cluster, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    resumed_from = int(re.search(r"\(restart 1\)[\s\S]*?steps (\d+) -> 400", text).group(1))
    assert resumed_from >= 20  # from the SIGTERM checkpoint, or at worst the last periodic one
    assert "done: step 400" in text
