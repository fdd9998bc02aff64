"""The mixed precision a run trains in (chosen by the user, the launcher or the hardware), and the
kernels it runs with."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from distgan.errors import UserError
from distgan.runtime.launch_env import LauncherPrecision, launcher_precision


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX, where bf16 autocast is a real speed-up."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_precision() -> str:
    """bf16 where the GPU computes it natively (Ampere and later); fp16 with loss scaling on
    tensor-core GPUs without it (V100, T4), where torch would emulate bf16 slowly; else fp32."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    major, _ = torch.cuda.get_device_capability()
    return "fp16" if major >= 7 else "no"


def native_precision() -> str:
    """What this machine computes fastest: bf16 or fp16 where native, else no (fp32)."""
    if torch.cuda.is_available():
        return gpu_precision()
    return "bf16" if cpu_has_native_bf16() else "no"


class Precision(NamedTuple):
    """The mixed precision a run trains in, and who chose it (for the start-up line)."""

    name: str  # no, fp16 or bf16
    why: str


def choose_precision(requested: str, launcher: LauncherPrecision | None = None) -> Precision:
    """The precision to run: --mixed-precision if it names one; for `auto`, the launcher's choice
    if it made one (its `--mixed_precision`, or its config file: see runtime/launch_env.py), else
    what the hardware computes fastest (bf16, or fp16 on tensor-core GPUs without bf16), else
    fp32. `launcher` defaults to what this process's launcher was given."""
    has_cuda = torch.cuda.is_available()
    launcher = launcher_precision() if launcher is None else launcher
    if requested != "auto":
        overruled = launcher.choice not in (None, requested)
        why = f"--mixed-precision, over {launcher.source}" if overruled else "--mixed-precision"
    elif launcher.choice is not None:
        requested, why = launcher.for_auto(), f"auto: {launcher.source}"
    else:
        requested = native_precision()
        over = f", over {launcher.source}" if launcher.source else ""
        why = f"auto: native here{over}; --mixed-precision no for fp32"
        if requested == "no":
            why = "auto: no native bf16 or fp16 here"
    if requested == "fp16" and not has_cuda:
        raise UserError(
            f"mixed_precision=fp16 needs a CUDA GPU and none was found ({why}): use bf16 or no"
        )
    return Precision(requested, why)


def resumed_precision(chosen: Precision, trained_in: str) -> Precision:
    """`auto` on resume goes on in the checkpoint's precision: what auto picks can change under
    a run (another launcher line, a requeued job's older script), and a run resumes as trained."""
    if chosen.name == trained_in:
        return chosen
    return Precision(trained_in, f"auto: the checkpoint's; auto would pick {chosen.name} now")


def resolve_mixed_precision(requested: str) -> str:
    """The precision `choose_precision` picks, by name."""
    return choose_precision(requested).name


def configure_kernels(deterministic: bool) -> None:
    """cuDNN's autotuner picks the fastest convolutions for the step's fixed shapes, unless the
    run must repeat bit for bit (then only deterministic kernels; those without one warn)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    if deterministic or torch.are_deterministic_algorithms_enabled():  # its import costs ~1 s
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
