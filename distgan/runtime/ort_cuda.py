"""onnxruntime's CUDA provider in a process without torch, as `python -m export generate` runs.

The provider's library needs the CUDA runtime, cuBLAS and cuDNN. A pip install puts them under
site-packages/nvidia/*/lib, where the dynamic loader does not look; `import torch` loads them as
a side effect, so a process with torch finds them and one without does not.
`preload_cuda_libraries` loads them as onnxruntime documents (`onnxruntime.preload_dlls`), and
`python -m distgan.runtime.ort_cuda` tries the provider in a process without torch (what
`python -m distgan.runtime.env` reports). Imports no torch, and onnxruntime only when asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from distgan.errors import first_line

PROVIDER = "CUDAExecutionProvider"
PROVIDER_LIBRARIES = ("libonnxruntime_providers_cuda.so", "onnxruntime_providers_cuda.dll")


@functools.cache
def preload_cuda_libraries() -> None:
    """Load, once, the CUDA and cuDNN libraries this onnxruntime-gpu build needs, from pip's
    nvidia packages (else the default search path). Does nothing where onnxruntime is a CPU
    build or has no `preload_dlls` (before 1.21); a library that is missing is left to
    `cuda_provider_problem` to name."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not getattr(ort, "cuda_version", ""):
        return
    # It prints what it cannot load to stdout (where `evaluate` writes its JSON) and may warn.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):  # a preload is a help, never a failure
            preload()


def cuda_provider_problem() -> str | None:
    """What the dynamic loader says about onnxruntime's CUDA provider library in this process
    (e.g. "libcublasLt.so.13: cannot open shared object file: ..."), or None where it loads or
    this onnxruntime has none."""
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    for name in PROVIDER_LIBRARIES:
        if (capi / name).is_file():
            try:
                ctypes.CDLL(str(capi / name))
            except OSError as err:
                return first_line(err)
    return None


def probe() -> str | None:
    """In this process: None where a session that asks for CUDA gets it and convolves right
    (cuDNN too), else why not."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as err:
        return f"onnx/onnxruntime is not installed ({err})"
    name = f"onnxruntime {ort.__version__}"
    if PROVIDER not in ort.get_available_providers():
        return f"{name} has no CUDA provider (a CPU build: pip install onnxruntime-gpu)"
    preload_cuda_libraries()
    weight = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in "xy")
    graph = helper.make_graph([conv], "probe", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=[PROVIDER, "CPUExecutionProvider"]
        )
        if session.get_providers()[0] != PROVIDER:
            why = cuda_provider_problem() or "its CUDA provider did not start"
            return f"{name} falls back to the CPU: {why}"
        out = session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})[0]
    except Exception as err:  # onnxruntime's own error types
        return f"{name}'s CUDA provider fails: {type(err).__name__}: {first_line(err)}"
    if out[0, 0, 1, 1] != 9.0:
        return f"{name}'s CUDA provider computes a wrong convolution ({out[0, 0, 1, 1]} != 9)"
    return None


def problem_without_torch(timeout: float = 180) -> str | None:
    """`probe` in a fresh process without torch: in one that imported torch, the libraries torch
    loaded make the provider look fine where `python -m export generate` cannot use it."""
    here = str(Path(__file__).resolve().parents[1])  # so that a checkout works uninstalled
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-m", "distgan.runtime.ort_cuda"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"the torch-free check took over {timeout:g} s"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["problem"]
    except (IndexError, ValueError, KeyError):
        said = done.stderr.strip().splitlines() or ["no output"]
        return f"the torch-free check failed (exit {done.returncode}: {said[-1][:200]})"


if __name__ == "__main__":
    with contextlib.suppress(ImportError):
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # the answer says what failed, on one line
    print(json.dumps({"problem": probe(), "torch_loaded": "torch" in sys.modules}))
