"""What this machine gives the job: usable CPUs and memory (affinity and cgroup limits, as SLURM
and containers set them), whether NVIDIA GPUs are visible, and whether the installed torch, DALI
and onnxruntime builds can use them.

`python -m distgan.runtime.env` prints all of it, and exits 1 when something would make training run
somewhere other than where the user expects (GPUs visible but torch without CUDA, two DALI builds).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from distgan.errors import UserError
from distgan.runtime import ort_cuda

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# The oldest Linux driver each CUDA major runs on (NVIDIA's CUDA compatibility table).
MIN_DRIVER = {"12": 525, "13": 580}
DALI_PREFIX = "nvidia-dali-cuda"
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS")
GPU_ENV_VARS = (*GPU_COUNT_VARS, "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
CUDA12_INSTALL = "README.md, 'CUDA 12 clusters'"


def _cgroup_dirs(controller: str, root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup folder for `controller` ("" for cgroup v2) and its ancestors, those
    that exist here (a container sees its own cgroup as the root)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller in controllers.split(",")) if controller else controllers == "":
            base = root / controllers if controller else root  # v1: e.g. cpu,cpuacct/
            parts = Path(path.lstrip("/")).parts
            found = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
            return [d for d in found if d.is_dir()]
    return []


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return None if text == "max" else int(text)


def _inactive_file(folder: Path, key: str) -> int:
    """Page cache the kernel can drop: it counts as used in the cgroup, but is not."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes this process's cgroups (v2, or v1's memory controller) still allow, the tightest of
    them and their ancestors; None when no limit is set."""
    headroom = None
    layouts = (
        ("", "memory.max", "memory.current", "inactive_file"),
        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    )
    for controller, limit_file, usage_file, inactive_key in layouts:
        for folder in _cgroup_dirs(controller, root, proc_cgroup):
            limit = _read_int(folder / limit_file)
            if limit is None or limit >= 2**62:  # v1 writes "unlimited" as a huge number
                continue
            used = (_read_int(folder / usage_file) or 0) - _inactive_file(folder, inactive_key)
            room = max(0, limit - max(0, used))
            headroom = room if headroom is None else min(headroom, room)
    return headroom


def available_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = Path("/proc/meminfo")
) -> int:
    """Bytes of host memory this process can still take: the machine's MemAvailable, or less
    where a cgroup (a SLURM job, a container) sets a lower limit. 0 if unknown."""
    try:
        info = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0
    headroom = cgroup_memory_headroom(root, proc_cgroup)
    return free if headroom is None else min(free, headroom)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """CPUs allowed by a CFS quota (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us), rounded up."""
    limits = []
    for folder in _cgroup_dirs("", root, proc_cgroup):
        try:
            quota, period = (folder / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota != "max":
            limits.append(math.ceil(int(quota) / int(period)))
    for folder in _cgroup_dirs("cpu", root, proc_cgroup):
        quota = _read_int(folder / "cpu.cfs_quota_us")
        period = _read_int(folder / "cpu.cfs_period_us")
        if quota and quota > 0 and period:
            limits.append(math.ceil(quota / period))
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may run on: its affinity (what SLURM and taskset give), capped by a
    cgroup CPU quota. `os.cpu_count()` counts the whole machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return max(1, min(cpus, quota) if quota else cpus)


def local_processes() -> int:
    """Training processes on this machine (set by the launcher; 1 under plain python)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def visible_gpus(environ: Mapping[str, str] = os.environ, dev: Path = Path("/dev")) -> str | None:
    """What says that NVIDIA GPUs are meant for this job, or None. CUDA_VISIBLE_DEVICES set to ""
    or -1 hides them on purpose; inside a SLURM job, its allocation decides (a CPU job on a GPU
    node still sees the device files); elsewhere, the device files."""
    hidden = environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None:
        return None if hidden.strip() in ("", "-1") else f"CUDA_VISIBLE_DEVICES={hidden}"
    if "SLURM_JOB_ID" in environ:
        for name in GPU_ENV_VARS:  # counts ("0": none) first, then lists of GPU indices
            value = environ.get(name, "").strip()
            if value and not (name in GPU_COUNT_VARS and value == "0"):
                return f"{name}={value}"
        return None
    devices = sorted(str(p) for p in dev.glob("nvidia[0-9]*"))
    return ", ".join(devices) if devices else None


def driver_version(path: Path = DRIVER_VERSION_FILE) -> str | None:
    """The NVIDIA kernel driver's version (e.g. "580.65.06"), or None without one."""
    try:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", path.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def require_usable_cuda(
    environ: Mapping[str, str] = os.environ,
    dev: Path = Path("/dev"),
    driver_file: Path = DRIVER_VERSION_FILE,
) -> None:
    """Stop before any work when GPUs are there but torch cannot use them: training would
    otherwise run as CPU processes on a GPU node without a word."""
    import torch

    if torch.cuda.is_available():
        return
    evidence = visible_gpus(environ, dev)
    if evidence is None:
        return
    built = torch.version.cuda
    if built is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        driver = driver_version(driver_file)
        found = f"found {driver}" if driver else "no driver version found"
        needs = MIN_DRIVER.get(built.split(".")[0])
        why = f"torch {torch.__version__} is built for CUDA {built}" + (
            f", which needs NVIDIA driver >= {needs} ({found})" if needs else ""
        )
    raise UserError(
        f"GPUs are visible ({evidence}) but torch cannot use CUDA: {why}; install the builds for "
        f"this driver ({CUDA12_INSTALL}), or set CUDA_VISIBLE_DEVICES= to train on the CPU"
    )


def dali_builds() -> list[str]:
    """The installed DALI distributions, as "name version"."""
    names = {
        dist.metadata["Name"].lower(): dist.version
        for dist in importlib.metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith(DALI_PREFIX)
    }
    return [f"{name} {version}" for name, version in sorted(names.items())]


def require_one_dali_build(builds: list[str] | None = None) -> None:
    """Two DALI builds write the same nvidia/dali folder: whichever came last half-overwrote the
    other, so refuse to run on the mix."""
    builds = dali_builds() if builds is None else builds
    if len(builds) > 1:
        names = " ".join(b.split()[0] for b in builds)
        raise UserError(
            f"{len(builds)} DALI builds are installed ({', '.join(builds)}) and overwrite each "
            f"other: run `pip uninstall -y {names}`, then install the one for your CUDA "
            f"({CUDA12_INSTALL})"
        )


def _onnxruntime_line() -> str:
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime: not installed (pip install -e '.[export]')"
    available = ort.get_available_providers()
    line = f"onnxruntime {ort.__version__}: providers {', '.join(available)}"
    if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
        return line
    # Tried in a process without torch, as `python -m export generate` runs: here, the CUDA
    # libraries torch loaded would make the provider look fine where generate cannot load it.
    problem = ort_cuda.problem_without_torch()
    if problem is None:
        return line + "; a CUDA session without torch (python -m export generate) runs on the GPU"
    return line + f"; a CUDA session without torch FALLS BACK TO THE CPU ({problem})"


def report() -> tuple[list[str], list[str]]:
    """(lines describing the machine, problems found)."""
    import torch

    headroom = cgroup_memory_headroom()
    quota = cgroup_cpu_limit()
    lines = [
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"CPUs: {available_cpus()} usable (machine {os.cpu_count()}, cgroup quota "
        f"{quota or 'none'}); memory: {available_memory() / 2**30:.1f} GiB available (cgroup "
        f"headroom {'none' if headroom is None else f'{headroom / 2**30:.1f} GiB'})",
        f"NVIDIA driver: {driver_version() or 'none found'}; GPUs visible: "
        f"{visible_gpus() or 'none'}",
        f"torch {torch.__version__}: CUDA build {torch.version.cuda or 'none (CPU-only)'}, "
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        bf16 = major >= 8  # Ampere and later compute bf16 natively
        lines.append(
            f"  cuda:{index} {torch.cuda.get_device_name(index)}, compute capability "
            f"{major}.{minor}, native bf16: {bf16}"
        )
    lines.append(f"DALI: {', '.join(dali_builds()) or 'not installed'}")
    lines.append(_onnxruntime_line())
    problems = []
    for check in (require_usable_cuda, require_one_dali_build):
        try:
            check()
        except UserError as err:
            problems.append(str(err))
    return lines, problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distgan.runtime.env",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)  # no options: --help, and a clear error for anything else
    lines, problems = report()
    print("\n".join(lines))
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print("ok: training will use what is found above")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
