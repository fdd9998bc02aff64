"""`python -m export bench`: images/s of the exported model under onnxruntime vs the same weights in
PyTorch eager fp32, measured in one run, alternating, median of repeats.

Both sides do the same work: numpy z (and, for a conditional model, labels) in, the image on the
host as numpy out, so on CUDA both pay the upload of the inputs and the download of the image.
Each row names the device onnxruntime really ran on: a CUDA provider that fails to load falls
back to the CPU, and PyTorch then runs there too.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distgan.errors import UserError
from distgan.models.conditioning import draw_labels
from distgan.outputs.checkpoint import load_generator
from distgan.runtime.ort_providers import cuda_device_count
from export.generate import Runner
from export.runtime import create_session, model_info, session_device

MIN_SECONDS = 0.3  # each timed repeat runs at least this long, so batch 1 is not timer noise


def _time(run, min_seconds: float = MIN_SECONDS) -> float:
    """Seconds per call of `run()`, over as many calls as fill `min_seconds`."""
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def torch_side(generator, z: np.ndarray, device: torch.device, labels: np.ndarray | None = None):
    """PyTorch doing what Runner does: numpy z (and labels) in, numpy image on the host out."""

    def run() -> np.ndarray:
        with torch.no_grad():
            label = None if labels is None else torch.from_numpy(labels).to(device)
            return generator(torch.from_numpy(z).to(device), label).cpu().numpy()  # .cpu() waits

    return run


def ort_side(runner: Runner, z: np.ndarray, labels: np.ndarray | None = None):
    """onnxruntime through Runner (IO binding on CUDA): numpy z (and labels) in, numpy image
    out."""
    return lambda: runner(z, labels)


def measure(model_path, generator_path, batch_sizes, repeats: int, device: str) -> list[dict]:
    """One row per batch size: onnxruntime and PyTorch images/s (medians) and their ratio, with
    the device onnxruntime really ran on."""
    # "auto", not "cuda": a CUDA provider that fails to load then gives CPU rows labelled so
    session = create_session(model_path, "auto" if device == "cuda" else "cpu")
    ran_on = session_device(session)
    info = model_info(session)
    runner = Runner(session)
    generator, _ = load_generator(generator_path)
    torch_device = torch.device(ran_on)  # both sides where onnxruntime really runs
    generator = generator.to(torch_device)
    rows = []
    for batch in batch_sizes:
        rng = np.random.default_rng(0)
        z = rng.standard_normal((batch, info.z_dim), dtype=np.float32)
        drawn = draw_labels(generator.config, batch, generator=torch.Generator().manual_seed(0))
        labels = None if drawn is None else drawn.numpy()
        run_torch = torch_side(generator, z, torch_device, labels)
        run_ort = ort_side(runner, z, labels)
        run_torch(), run_ort()  # warm-up: allocations, algorithm choice
        ort_times, torch_times = [], []
        for _ in range(repeats):  # alternate, so drift in the machine hits both alike
            ort_times.append(_time(run_ort))
            torch_times.append(_time(run_torch))
        ort_ips = batch / statistics.median(ort_times)
        torch_ips = batch / statistics.median(torch_times)
        row = {
            "device": ran_on,
            "batch": batch,
            "onnxruntime_images_per_sec": round(ort_ips, 1),
            "torch_eager_fp32_images_per_sec": round(torch_ips, 1),
            "ratio": round(ort_ips / torch_ips, 2),
            "precision": info.precision,
            "output": info.output_format,
        }
        rows.append(row)
    return rows


def table_line(row: dict) -> str:
    """One of `measure`'s rows as a line of the Markdown table that `bench` prints."""
    ort, eager = row["onnxruntime_images_per_sec"], row["torch_eager_fp32_images_per_sec"]
    return f"| {row['device']} | {row['batch']} | {ort:.1f} | {eager:.1f} | {row['ratio']:.2f}x |"


def bench(model_path, generator_path, batch_sizes, repeats: int = 5) -> list[dict]:
    session = create_session(model_path, "cpu")
    source = session.get_modelmeta().custom_metadata_map.get("source_generator")
    generator_path = generator_path or source
    if not generator_path or not Path(generator_path).exists():
        raise UserError(
            "the PyTorch side needs the generator: pass --generator generator.safetensors"
        )
    devices = ["cpu"] + (["cuda"] if cuda_device_count() and torch.cuda.is_available() else [])
    threads = f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}"
    print(f"model {model_path}; PyTorch weights {generator_path}; {threads}")
    inputs = "numpy z" + (" and labels" if model_info(session).conditioning != "none" else "")
    print(f"both sides: {inputs} in, numpy image out (on CUDA: upload and download included)")
    print("| device | batch | onnxruntime img/s | PyTorch eager fp32 img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for device in devices:
        measured = measure(model_path, generator_path, batch_sizes, repeats, device)
        if measured and measured[0]["device"] != device:  # rows say what ran; say why here
            print(
                "note: onnxruntime's CUDA provider did not load (probably a CUDA/cuDNN version "
                "mismatch with the onnxruntime-gpu build): the rows below ran on the CPU",
                file=sys.stderr,
            )
        for row in measured:
            rows.append(row)
            print(table_line(row), flush=True)
    return rows
