"""Paired timing and memory measurement: every candidate runs once per round, in a rotating
order, for several rounds, so a slow moment of the machine hits all of them alike; a figure is
the median over rounds."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_rates(work: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict]:
    """{name: {"median": items/s, "all": [...]}}; each `work` function does one unit of work
    (waiting for the device at its end) and returns how many items it processed."""
    names = list(work)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            items = work[name]()
            rates[name].append(items / (time.perf_counter() - start))
    return {
        name: {"median": statistics.median(values), "all": [round(v, 2) for v in values]}
        for name, values in rates.items()
    }


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, rounds: int) -> float:
    """Achieved TFLOP/s of a large square matmul: the practical peak the step is compared to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    synchronize(device)
    calls = max(1, int(0.25 / _seconds(lambda: a @ b, device)))

    def run() -> int:
        for _ in range(calls):
            a @ b
        synchronize(device)
        return calls

    rate = paired_rates({"matmul": run}, rounds)["matmul"]["median"]
    return rate * 2 * size**3 / 1e12


def _seconds(fn: Callable, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def prepare_cpu_memory_measurement() -> bool:
    """Make resident memory follow live tensors: glibc otherwise keeps freed blocks, and the peak
    of a later step would hide under them. Call it after all timing (it changes the allocator's
    behaviour). False where the peak cannot be measured (no glibc or /proc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # fixed: large blocks are mapped, and unmapped
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM)
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one `run()` above what was in use before it, in MiB: on CUDA the caching
    allocator's peak; on CPU the process's peak resident memory (VmHWM, reset just before)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return (_status_kib("VmHWM") - before) / 1024
