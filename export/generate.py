"""`python -m export generate`: faces in bulk from an exported generator.

onnxruntime, numpy and Pillow only: no torch, so it runs wherever onnxruntime does. Each image is
drawn from its own seed (export/latents.py), so any face can be made again alone at any batch
size. A conditional model is asked for a class (`--class`, export/labels.py), which does not
change z: the same seed and class give the same image. Batches run on the GPU with IO binding
when there is one; PNGs are written by a thread pool while the next batch is generated.
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from distgan.errors import UserError, first_line, require_writable_dir
from export.labels import select_labels
from export.latents import MAX_SEED, check_truncation, latents, parse_seeds
from export.runtime import create_session, model_info, running_on, session_device

GRID_COLUMNS = 16  # with --class all: the grid shows the first 16 seeds of each class


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """`steps` latents along the great circle from a to b (Gaussian latents live near a sphere)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    cos = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def interpolate_latents(a: np.ndarray, b: np.ndarray, steps: int, distribution: str) -> np.ndarray:
    """Normal latents go along the great circle; uniform ones in a straight line, which stays in
    their cube."""
    if distribution == "normal":
        return slerp(a, b, steps)
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return (1 - t) * a + t * b


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Model output (float32 NCHW in [-1, 1], or uint8 NHWC) -> uint8 [B, H, W, 3] for RGB,
    [B, H, W] for grayscale: what Pillow saves as an RGB or an "L" image."""
    if images.dtype != np.uint8:  # float32 NCHW in [-1, 1]
        levels = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        images = levels.transpose(0, 2, 3, 1)
    return images[..., 0] if images.shape[-1] == 1 else images


def select_seeds(
    seeds: str | None, num: int | None, seed: int | None
) -> tuple[list[int], list[str]]:
    """The seeds to draw and each one's file name: `--seeds 0-35,100` writes seed0000.png, ...,
    seed0100.png; `--num N [--seed S]` writes 000000.png ... for seeds S, S + 1, ... (S = 0)."""
    if seeds is not None:
        if num is not None or seed is not None:
            given = "--num" if num is not None else "--seed"
            raise UserError(f"{given} and --seeds do not go together: --seeds names every seed")
        chosen = parse_seeds(seeds)
        return chosen, [seed_file_name(s) for s in chosen]
    if num is None:
        raise UserError("say which images: --seeds 0-35,100 (one PNG per seed) or --num N")
    if num < 1:
        raise UserError(f"--num {num} is not allowed: ask for at least 1 image")
    first = 0 if seed is None else seed
    if first < 0 or first + num - 1 > MAX_SEED:
        raise UserError(
            f"--seed {first} with --num {num} asks for seeds {first} .. {first + num - 1}: "
            f"seeds are 0 .. {MAX_SEED}"
        )
    return list(range(first, first + num)), [f"{i:06d}.png" for i in range(num)]


def seed_file_name(seed: int) -> str:
    return f"seed{seed:04d}.png"  # as StyleGAN's gen_images.py names them


class Runner:
    """Runs batches of z (and, for a conditional model, their labels) through a session: IO
    binding on CUDA, plain run on CPU."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.on_cuda = session_device(session) == "cuda"
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_name = session.get_outputs()[0].name

    def __call__(self, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        try:
            return self._run(z, labels)
        except Exception as err:  # onnxruntime's own error types: a shape or type the model rejects
            expected = [i.shape for i in self.session.get_inputs()]
            given = [list(z.shape)] + ([] if labels is None else [list(labels.shape)])
            detail = first_line(err, 160)
            raise UserError(
                f"the model rejected inputs of shapes {given} (it takes {expected}): {detail}"
            ) from None

    def _run(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        feeds = dict(zip(self.input_names, [z] if labels is None else [z, labels], strict=True))
        if not self.on_cuda:
            return self.session.run([self.output_name], feeds)[0]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def save_grid(pixels: np.ndarray, path: Path, columns: int | None = None) -> None:
    count, height, width = pixels.shape[:3]
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    size = (rows * (height + 2) + 2, columns * (width + 2) + 2)
    grid = np.zeros(size + pixels.shape[3:], np.uint8)  # [..., 3] RGB or grayscale
    for i, image in enumerate(pixels):
        top, left = 2 + (i // columns) * (height + 2), 2 + (i % columns) * (width + 2)
        grid[top : top + height, left : left + width] = image
    Image.fromarray(grid).save(path)


def row_folder(name: str, index: int) -> str:
    """The subfolder of a grid row's images (`--class all`): its name, made safe for a path
    ("Smiling + Male" -> "Smiling+Male")."""
    safe = re.sub(r"[^\w.+-]", "_", name.replace(" + ", "+"))
    return f"class{index}" if safe.strip(".") == "" else safe


class Progress:
    """ "generated 40/100 (350 images/s)" on stderr, updated in place."""

    def __init__(self, total: int, shown: bool):
        self.total, self.shown, self.done = total, shown, 0
        self.start = time.perf_counter()

    def add(self, count: int) -> None:
        self.done += count
        if self.shown:
            rate = self.done / (time.perf_counter() - self.start)
            line = f"\rgenerated {self.done}/{self.total} ({rate:.0f} images/s)"
            print(line, end="", file=sys.stderr)

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def generate(
    model: str | Path,
    seeds: list[int],
    batch_size: int,
    out_dir: str | Path,
    *,
    names: list[str] | None = None,
    grid: str | Path | None = None,
    truncation_psi: float = 1.0,
    truncation_threshold: float | None = None,
    interpolate: int | None = None,
    z_dim: int | None = None,
    device: str = "auto",
    progress: bool = True,
    label: str | None = None,
) -> list[Path]:
    """Write one PNG per seed to `out_dir` (`names`, else seed0000.png, ...): image i comes from
    the z of seeds[i] alone. Optionally a grid of the first 64, and an interpolation from the
    first seed's z to the last's.

    A conditional model needs `label` (`--class`, export/labels.py): one class for every image,
    or "all": then each grid row (class, or attribute combination) has its own subfolder of
    `out_dir` with one PNG per seed, and the grid (`grid`, else OUT_DIR/grid.png) has one row
    per class and a column per seed (the first GRID_COLUMNS)."""
    names = names or [seed_file_name(s) for s in seeds]
    if not seeds or len(names) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds and {len(names)} file names")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is not allowed: use 1 or more")
    check_truncation(truncation_psi, truncation_threshold)
    if interpolate is not None and interpolate < 2:
        raise UserError(f"--interpolate {interpolate} is not allowed: use 2 or more frames")
    if interpolate is not None and len(seeds) < 2:
        raise UserError("--interpolate walks from the first seed to the last: give two or more")
    out_dir = Path(out_dir)
    session = create_session(model, device)
    info = model_info(session, z_dim)
    rows = select_labels(label, info.conditioning, info.classes)
    if rows is not None and len(rows) > 1 and interpolate:
        raise UserError("--interpolate walks within one class: give --class NAME, not --class all")
    require_writable_dir(out_dir, "--out-dir")
    run = Runner(session)
    if progress:  # what really runs: "auto" falls back to the CPU when CUDA does not load
        print(f"onnxruntime: {running_on(session, device)}", file=sys.stderr)
    truncation = dict(psi=truncation_psi, threshold=truncation_threshold)

    def z_of(chosen: list[int]) -> np.ndarray:
        return latents(chosen, info.z_dim, info.z_distribution, **truncation)

    by_row = rows is not None and len(rows) > 1
    folders = [out_dir / row_folder(row.name, i) for i, row in enumerate(rows)] if by_row else []
    for folder in folders:
        require_writable_dir(folder, "--out-dir")
    jobs = list(zip(rows, folders, strict=True)) if by_row else [((rows or [None])[0], out_dir)]
    counter = Progress(len(jobs) * len(seeds), progress)
    paths, firsts = [], []  # each job's first images, for the grid
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as writers:
        for row, folder in jobs:
            written, first_images = write_images(
                run, z_of, row, seeds, [folder / n for n in names], batch_size, writers, counter
            )
            paths += written
            firsts.append(first_images)
    counter.end()
    if by_row:  # one row per class: the first GRID_COLUMNS seeds
        columns = min(len(seeds), GRID_COLUMNS)
        rows_pixels = np.concatenate([pixels[:columns] for pixels in firsts])
        save_grid(rows_pixels, Path(grid or out_dir / "grid.png"), columns)
    elif grid:
        save_grid(firsts[0], Path(grid))
    if interpolate:
        ends = z_of([seeds[0], seeds[-1]])
        walk = interpolate_latents(ends[0], ends[1], interpolate, info.z_distribution)
        frames = to_pixels(run(walk, None if rows is None else rows[0].batch(interpolate)))
        save_grid(frames, out_dir / "interpolation.png", columns=interpolate)
        loop = [Image.fromarray(f) for f in np.concatenate([frames, frames[-2:0:-1]])]  # ping-pong
        animation = dict(save_all=True, append_images=loop[1:], duration=80, loop=0)
        loop[0].save(out_dir / "interpolation.gif", **animation)
    return paths


def write_images(run, z_of, row, seeds, paths, batch_size, writers, counter, keep=64):
    """Generate the images of `seeds` (with `row`'s label, if any) batch by batch and have
    `writers` save them to `paths`; returns the paths and the pixels of the first `keep`."""
    pending: list[Future] = []
    kept = []
    for first in range(0, len(seeds), batch_size):
        chosen = seeds[first : first + batch_size]
        labels = None if row is None else row.batch(len(chosen))
        pixels = to_pixels(run(z_of(chosen), labels))
        pending += [
            writers.submit(Image.fromarray(image).save, paths[first + k])
            for k, image in enumerate(pixels)
        ]
        if sum(len(p) for p in kept) < keep:
            kept.append(pixels[: keep - sum(len(p) for p in kept)])
        while len(pending) > 4 * batch_size:  # bound memory: let the writers catch up
            pending.pop(0).result()
        counter.add(len(chosen))
    for job in pending:
        job.result()
    return paths, np.concatenate(kept)
