"""SLURM, for real: a one-node cluster (slurmctld + slurmd + munged) on localhost runs the
project's own launch/slurm/train.sbatch with 2 CPU processes, overriding its CPUs and memory per
node on the sbatch command line as a user of a small node would. A job trains to the end, its step
bound to the CPUs the job asked for and each trainer given its share of them; a job warned with
SIGUSR1 (as before its time limit) checkpoints, requeues itself and resumes; a job requeued by
`scontrol requeue` mid-run resumes from its checkpoint. The script chooses no precision, so the
trainers' `--mixed-precision auto` does (bf16 on a CPU that has it)."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from distgan.training.precision import native_precision
from tests.helpers import REPO, small_run

pytestmark = pytest.mark.slow
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged", "mungekey")
PROCESSES = 2  # trainers per node (DISTGAN_PROCS_PER_NODE)
CPUS = min(2, os.cpu_count())  # the job's --cpus-per-task: the whole (small) test node
MUNGE_FILES = (
    ("key-file", "munge.key"),
    ("socket", "munge.sock"),
    ("pid-file", "munged.pid"),
    ("seed-file", "munge.seed"),
)
MEMORY_MB = 4096  # the job's --mem (the script's default, --mem=0: all of the node's)


def binds_tasks() -> bool:
    """Whether slurmd can bind each task to its cores here (task/affinity), as GPU clusters do:
    this process may run on every CPU, and each CPU is a core of its own (no SMT siblings), as
    the node is declared (CPUs=N: N cores). Only where tasks are bound does a step that got fewer
    CPUs than its job (srun does not inherit --cpus-per-task) run on fewer."""
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    return (
        os.sched_getaffinity(0) == set(range(os.cpu_count()))
        and siblings.is_file()
        and siblings.read_text().strip() == "0"
    )


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
        absent = ", ".join(missing)
        pytest.skip(f"Debian's slurm-wlm and munge are not installed (no {absent}); .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons (munged, slurmd) need root, and this is not root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
    task_plugin = "task/affinity\nTaskPluginParam=Cores" if binds_tasks() else "task/none"
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
TaskPlugin={task_plugin}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
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
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    files = [f"--{flag}={root}/{name}" for flag, name in MUNGE_FILES]
    munged = ["munged", "--foreground", "--force", *files, f"--log-file={root}/log/munged.log"]
    daemons = [subprocess.Popen(munged, **quiet)]
    wait_for(lambda: (root / "munge.sock").exists(), 10)
    for command in (
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf), "-N", host],
    ):
        daemons.append(subprocess.Popen(command, env=env, **quiet))

    def node_idle():
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        return sinfo.stdout.strip() == "idle"

    if not wait_for(node_idle, 60):
        written = [p for p in sorted((root / "log").glob("*.log")) if p.read_text().strip()]
        logs = " | ".join(f"{p.name}: {p.read_text().strip().splitlines()[-1]}" for p in written)
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
    steps = ("--ckpt-every", ckpt_every, "--max-steps", max_steps)
    train_args = small_run(out_dir, faces_cache, *steps, sample_every=1000)
    resources = [f"--cpus-per-task={CPUS}", f"--mem={MEMORY_MB}", f"--output={log}"]
    # A fresh HF_HOME: no Accelerate config file of this machine's user chooses a precision.
    hf_home = out_dir.parent / "hf"
    exported = f"--export=ALL,DISTGAN_PROCS_PER_NODE={PROCESSES},HF_HOME={hf_home}"
    command = ["sbatch", "--parsable", exported, *resources, "launch/slurm/train.sbatch"]
    result = subprocess.run(
        [*command, *map(str, train_args)], env=env, capture_output=True, text=True, cwd=REPO
    )
    result.check_returncode()
    return result.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str | None:
    shown = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    )
    match = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return match.group(1) if match else None


def wait_until_done(env, job: str, timeout: float = 300) -> str:
    ended = ("COMPLETED", "FAILED", "CANCELLED")
    done = wait_for(lambda: job_field(env, job, "JobState") in ended, timeout, every=1)
    assert done, f"job {job} still {job_field(env, job, 'JobState')} after {timeout} s"
    return job_field(env, job, "JobState")


def wait_for_steps(metrics: Path, lines: int) -> None:
    assert wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= lines, 180
    )


def start_requeued_job_now(env, job: str) -> None:
    """SLURM holds a requeued job for a while (BeginTime); a test need not wait for that."""

    def held() -> bool:
        return (
            job_field(env, job, "Restarts") == "1" and job_field(env, job, "JobState") == "PENDING"
        )

    assert wait_for(held, 120)
    # But not within the second of the requeue: slurmd revoked the job's credentials then (to
    # the second), and a batch job started in that same second fails: "Job credential revoked".
    time.sleep(2)
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
    # The CPUs and memory reach the job, its step (srun is told --cpus-per-task again:
    # SRUN_CPUS_PER_TASK; without it the bound step would run on 1 CPU) and the trainers, which
    # get their share as DALI threads (the default, 2, without the script's --num-threads).
    share = max(1, CPUS // PROCESSES)
    assert f"per node {CPUS} CPUs, {MEMORY_MB} MB" in text, text[:2000]
    node_line = f"{CPUS} CPUs for {PROCESSES} processes, {share} threads each"
    assert node_line in text, text[:2000]
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["data"]["num_threads"] == share
    # The script chooses no precision (Accelerate warns it defaulted to no): distgan's auto
    # decides, bf16 on a CPU with AVX-512 BF16, and the start-up line says so.
    native = native_precision()
    state = json.loads((out / "checkpoints" / "step-00000030" / "trainer_state.json").read_text())
    assert config["train"]["mixed_precision"] == "auto" and state["precision"] == native
    over_default = "over accelerate launch's default no; --mixed-precision no for fp32"
    assert native == "no" or f"precision {native} (auto: native here, {over_default})" in text


# As --signal=USR1@T (every process of the job's steps) and --signal=B:USR1@T (the batch shell).
@pytest.mark.parametrize("to", [[], ["--batch"]], ids=["steps", "batch-shell"])
def test_sigusr1_before_the_time_limit_checkpoints_requeues_and_resumes(
    cluster, tmp_path, faces_cache, to
):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(cluster, out, log, faces_cache, max_steps=400)
    wait_for_steps(out / "metrics.jsonl", 4)
    subprocess.run(["scancel", "--signal=USR1", *to, job], env=cluster, check=True)
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
