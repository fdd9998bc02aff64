"""`python -m export generate`: faces in bulk from an exported generator.

onnxruntime, numpy and Pillow only: no torch, so it runs wherever onnxruntime does. Batches run
on the GPU with IO binding when there is one; PNGs are written by a thread pool while the next
batch is generated.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from distgan.errors import UserError, first_line, require_writable_dir
from export.runtime import UINT8_OUTPUT, create_session, model_info, session_device


def latents(num: int, z_dim: int, seed: int, truncation: float | None = None) -> np.ndarray:
    """`num` latents from N(0, 1), the same for the same seed. With `truncation` T, components
    beyond +-T are redrawn (the truncation trick: fewer, more typical faces)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num, z_dim), dtype=np.float32)
    if truncation is not None:
        outside = np.abs(z) > truncation
        while outside.any():
            z[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
            outside = np.abs(z) > truncation
    return z


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """`steps` latents along the great circle from a to b (Gaussian latents live near a sphere)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    cos = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def to_pixels(images: np.ndarray, output_format: str) -> np.ndarray:
    """Model output -> uint8 [B, H, W, 3]."""
    if output_format == UINT8_OUTPUT:
        return images
    return np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


class Runner:
    """Runs batches of z through a session: IO binding on CUDA, plain run on CPU."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.on_cuda = session_device(session) == "cuda"
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, z: np.ndarray) -> np.ndarray:
        try:
            return self._run(z)
        except Exception as err:  # onnxruntime's own error types: a shape or type the model rejects
            expected = self.session.get_inputs()[0].shape
            detail = first_line(err, 160)
            raise UserError(
                f"the model rejected z of shape {list(z.shape)} (it takes {expected}): {detail}"
            ) from None

    def _run(self, z: np.ndarray) -> np.ndarray:
        if not self.on_cuda:
            return self.session.run([self.output_name], {self.input_name: z})[0]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def save_grid(pixels: np.ndarray, path: Path, columns: int | None = None) -> None:
    count, height, width, _ = pixels.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    grid = np.zeros((rows * (height + 2) + 2, columns * (width + 2) + 2, 3), np.uint8)
    for i, image in enumerate(pixels):
        top, left = 2 + (i // columns) * (height + 2), 2 + (i % columns) * (width + 2)
        grid[top : top + height, left : left + width] = image
    Image.fromarray(grid).save(path)


def generate(
    model: str | Path,
    num: int,
    batch_size: int,
    out_dir: str | Path,
    *,
    grid: str | Path | None = None,
    seed: int = 0,
    truncation: float | None = None,
    interpolate: int | None = None,
    z_dim: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Write `num` PNGs (000000.png, ...) to `out_dir`; optionally a grid and an interpolation."""
    if num < 1:
        raise UserError(f"--num {num} is not allowed: ask for at least 1 image")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is not allowed: use 1 or more")
    if truncation is not None and truncation <= 0:
        raise UserError(f"--truncation {truncation} is not allowed: use a value > 0 (e.g. 0.7)")
    if interpolate is not None and interpolate < 2:
        raise UserError(f"--interpolate {interpolate} is not allowed: use 2 or more frames")
    out_dir = Path(out_dir)
    session = create_session(model, device)
    info = model_info(session, z_dim)
    require_writable_dir(out_dir, "--out-dir")
    run = Runner(session)
    if progress:  # what really runs: "auto" falls back to the CPU when CUDA does not load
        print(f"onnxruntime: {session.get_providers()[0]}", file=sys.stderr)
    z_all = latents(num, info.z_dim, seed, truncation)
    paths = [out_dir / f"{i:06d}.png" for i in range(num)]
    grid_pixels = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as writers:
        pending: list[Future] = []
        for first in range(0, num, batch_size):
            pixels = to_pixels(run(z_all[first : first + batch_size]), info.output_format)
            pending += [
                writers.submit(Image.fromarray(image).save, paths[first + k])
                for k, image in enumerate(pixels)
            ]
            if grid and sum(len(p) for p in grid_pixels) < 64:
                grid_pixels.append(pixels[: 64 - sum(len(p) for p in grid_pixels)])
            while len(pending) > 4 * batch_size:  # bound memory: let the writers catch up
                pending.pop(0).result()
            if progress:
                done = min(first + batch_size, num)
                rate = done / (time.perf_counter() - start)
                print(f"\rgenerated {done}/{num} ({rate:.0f} images/s)", end="", file=sys.stderr)
        for job in pending:
            job.result()
    if progress:
        print(file=sys.stderr)
    if grid:
        save_grid(np.concatenate(grid_pixels), Path(grid))
    if interpolate:
        ends = latents(2, info.z_dim, seed + 1, truncation)
        frames = to_pixels(run(slerp(ends[0], ends[1], interpolate)), info.output_format)
        save_grid(frames, out_dir / "interpolation.png", columns=interpolate)
        loop = [Image.fromarray(f) for f in np.concatenate([frames, frames[-2:0:-1]])]  # ping-pong
        animation = dict(save_all=True, append_images=loop[1:], duration=80, loop=0)
        loop[0].save(out_dir / "interpolation.gif", **animation)
    return paths
