"""`python -m export bench`: images/s of the exported model under onnxruntime vs the same weights in
PyTorch eager fp32, measured in one run, alternating, median of repeats."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from distgan.checkpoint import load_generator
from distgan.errors import UserError
from export.generate import Runner
from export.runtime import create_session, cuda_device_count, model_info

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


def measure(model_path, generator_path, batch_sizes, repeats: int, device: str) -> list[dict]:
    """One row per batch size: onnxruntime and PyTorch images/s (medians) and their ratio."""
    session = create_session(model_path, device)
    info = model_info(session)
    runner = Runner(session)
    generator, _ = load_generator(generator_path)
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    generator = generator.to(torch_device)
    rows = []
    for batch in batch_sizes:
        z = np.random.default_rng(0).standard_normal((batch, info.z_dim), dtype=np.float32)
        z_torch = torch.from_numpy(z).to(torch_device)

        def run_torch(z_torch=z_torch):
            with torch.no_grad():
                image = generator(z_torch)
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            return image

        def run_ort(z=z):
            return runner(z)

        run_torch(), run_ort()  # warm-up: allocations, algorithm choice
        ort_times, torch_times = [], []
        for _ in range(repeats):  # alternate, so drift in the machine hits both alike
            ort_times.append(_time(run_ort))
            torch_times.append(_time(run_torch))
        ort_ips = batch / statistics.median(ort_times)
        torch_ips = batch / statistics.median(torch_times)
        rows.append({
            "device": device, "batch": batch, "onnxruntime_images_per_sec": round(ort_ips, 1),
            "torch_eager_fp32_images_per_sec": round(torch_ips, 1),
            "ratio": round(ort_ips / torch_ips, 2), "precision": info.precision,
            "output": info.output_format,
        })  # fmt: skip
    return rows


def bench(model_path, generator_path, batch_sizes, repeats: int = 5) -> list[dict]:
    session = create_session(model_path, "cpu")
    source = session.get_modelmeta().custom_metadata_map.get("source_generator")
    generator_path = generator_path or source
    if not generator_path or not Path(generator_path).exists():
        raise UserError(
            "the PyTorch side needs the generator: pass --generator generator.safetensors"
        )
    devices = ["cpu"] + (["cuda"] if cuda_device_count() and torch.cuda.is_available() else [])
    print(f"model {model_path}; PyTorch weights {generator_path}; torch threads "
          f"{torch.get_num_threads()}, cores {os.cpu_count()}")  # fmt: skip
    print("| device | batch | onnxruntime img/s | PyTorch eager fp32 img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for device in devices:
        for row in measure(model_path, generator_path, batch_sizes, repeats, device):
            rows.append(row)
            print(f"| {device} | {row['batch']} | {row['onnxruntime_images_per_sec']:.1f} | "
                  f"{row['torch_eager_fp32_images_per_sec']:.1f} | {row['ratio']:.2f}x |",
                  flush=True)  # fmt: skip
    return rows
