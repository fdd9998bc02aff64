"""Which onnxruntime execution providers a session asks for: CUDA where a GPU and onnxruntime's
CUDA provider are there, else the CPU (CUDA asked for where there is none: a one-line error).
The one choice, for `python -m export` and `distgan evaluate --onnx`.

Imports no torch (`python -m export generate` runs without it): the GPUs are counted by asking
the CUDA driver, and the CUDA libraries of a pip install are preloaded (runtime/ort_cuda.py).
"""

from __future__ import annotations

import ctypes

import onnxruntime as ort

from distgan.errors import UserError
from distgan.runtime.ort_cuda import preload_cuda_libraries

DEVICES = ("auto", "cpu", "cuda")
CPU_ONLY = ["CPUExecutionProvider"]


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports, asked of the driver itself: onnxruntime-gpu lists its CUDA
    provider even where there is no GPU, and asking for it there prints errors."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def pick_providers(device: str = "auto") -> list:
    """CUDA (with the cuDNN heuristic algorithm choice, so a new batch size does not pay seconds
    of search) when asked or when a GPU is there, else CPU. Before CUDA, the CUDA and cuDNN
    libraries of a pip install are preloaded: without torch, nothing else loads them."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not allowed: use one of {', '.join(DEVICES)}")
    cuda_ready = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count()
    if device == "cuda" and not cuda_ready:
        raise UserError("--device cuda: no CUDA GPU/provider is available here; use --device cpu")
    if device != "cpu" and cuda_ready:
        preload_cuda_libraries()
        cuda_options = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    return list(CPU_ONLY)
