"""The built-in default dataset: procedurally drawn faces, rendered once to JPEG files and cached.

It lets the quickstart train on a fresh machine with no download. Each face varies in head shape
and size, skin, hair (colour and style), background, clothes, eye and mouth position and shape,
eyebrows, pose (shift, roll, a hint of yaw) and sensor noise. Image i is a pure function of
(i, size), so every machine renders the same dataset.
"""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from distgan.env import available_cpus

VERSION = 1
SUPERSAMPLE = 2
SKIN_TONES = [
    (255, 224, 196),
    (241, 194, 160),
    (224, 172, 131),
    (198, 134, 95),
    (141, 85, 56),
    (96, 60, 40),
]
HAIR_COLOURS = [
    (20, 16, 14),
    (70, 45, 30),
    (120, 80, 45),
    (200, 160, 90),
    (150, 60, 30),
    (160, 160, 160),
]
IRIS_COLOURS = [(70, 45, 25), (40, 90, 150), (60, 110, 60), (30, 25, 20), (110, 90, 60)]


def _jitter(rng: np.random.Generator, colour, amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _ellipse(draw: ImageDraw.ImageDraw, cx, cy, rx, ry, fill) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def render_face(index: int, size: int = 128) -> Image.Image:
    """Draw face number `index` as an RGB image of `size` x `size` pixels."""
    rng = np.random.default_rng([VERSION, index])
    s = size * SUPERSAMPLE
    u = s / 256  # drawing units: the face is designed on a 256 px canvas

    top, bottom = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    ramp = np.linspace(0, 1, s)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(s, axis=1).astype(np.uint8)
    canvas = Image.fromarray(background).convert("RGBA")

    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx = s / 2 + rng.normal(0, 8) * u
    cy = s / 2 + rng.normal(6, 8) * u
    rx = rng.uniform(64, 88) * u
    ry = rx * rng.uniform(1.15, 1.4)
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 10)
    shade = tuple(int(c * 0.82) for c in skin)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 12)
    clothes = tuple(int(c) for c in rng.integers(0, 256, 3))
    yaw = rng.uniform(-1, 1)  # shifts the features sideways within the head
    fx = cx + yaw * rx * 0.18

    # Shoulders and neck, then long hair behind the head.
    _ellipse(draw, cx, cy + ry * 1.75, rx * 2.0, ry * 0.75, clothes + (255,))
    draw.rectangle([cx - rx * 0.35, cy + ry * 0.6, cx + rx * 0.35, cy + ry * 1.15], fill=shade)
    hair_style = rng.integers(3)  # 0 short, 1 medium, 2 long
    if hair_style > 0:
        length = ry * (0.6 if hair_style == 1 else 1.3)
        hair_box = [cx - rx * 1.15, cy - ry * 0.7, cx + rx * 1.15, cy + length]
        draw.rounded_rectangle(hair_box, radius=int(rx * 0.5), fill=hair)
    _ellipse(draw, cx, cy - ry * 0.12, rx * 1.1, ry * 1.02, hair)

    # Ears, head.
    for side in (-1, 1):
        _ellipse(draw, cx + side * rx * 0.97, cy + ry * 0.02, rx * 0.16, ry * 0.17, shade)
    _ellipse(draw, cx, cy, rx, ry, skin)

    # Fringe over the forehead.
    fringe = rng.uniform(0.45, 0.8)
    fringe_bottom = cy - ry * (1.05 - 1.2 * fringe)
    draw.chord([cx - rx * 1.02, cy - ry * 1.05, cx + rx * 1.02, fringe_bottom], 180, 360, fill=hair)

    # Eyes, irises, pupils, eyebrows.
    eye_y = cy - ry * rng.uniform(0.02, 0.16)
    eye_dx = rx * rng.uniform(0.36, 0.48)
    eye_rx, eye_ry = rx * rng.uniform(0.15, 0.22), ry * rng.uniform(0.06, 0.1)
    iris = _jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10)
    gaze = rng.uniform(-0.35, 0.35) * eye_rx
    brow_lift, brow_tilt = rng.uniform(1.6, 2.6), rng.uniform(-0.25, 0.25)
    for side in (-1, 1):
        ex = fx + side * eye_dx
        _ellipse(draw, ex, eye_y, eye_rx, eye_ry, (245, 245, 240))
        _ellipse(draw, ex + gaze, eye_y, eye_ry * 0.95, eye_ry * 0.95, iris)
        _ellipse(draw, ex + gaze, eye_y, eye_ry * 0.45, eye_ry * 0.45, (10, 10, 10))
        by = eye_y - eye_ry * brow_lift
        tilt = side * brow_tilt * eye_ry * 2
        brow = [ex - eye_rx * 1.1, by + tilt, ex + eye_rx * 1.1, by - tilt]
        draw.line(brow, fill=hair, width=max(1, int(ry * 0.045)))

    # Nose.
    nose_y = cy + ry * rng.uniform(0.2, 0.3)
    nose_w = rx * rng.uniform(0.1, 0.18)
    draw.polygon([(fx, eye_y + eye_ry), (fx - nose_w, nose_y), (fx + nose_w, nose_y)], fill=shade)

    # Mouth: a chord whose curvature is the smile; sometimes open.
    mouth_y = cy + ry * rng.uniform(0.48, 0.62)
    mouth_w = rx * rng.uniform(0.28, 0.5)
    smile = rng.uniform(-0.3, 1.0)
    lips = _jitter(rng, (170, 70, 70), 20)
    height = ry * 0.12 * abs(smile) + ry * 0.03
    box = [fx - mouth_w, mouth_y - height, fx + mouth_w, mouth_y + height]
    draw.chord(box, 0 if smile >= 0 else 180, 180 if smile >= 0 else 360, fill=lips)
    if smile > 0.6 and rng.random() < 0.5:
        inner = [
            fx - mouth_w * 0.7,
            mouth_y - height * 0.3,
            fx + mouth_w * 0.7,
            mouth_y + height * 0.7,
        ]
        draw.chord(inner, 0, 180, fill=(250, 250, 250))

    layer = layer.rotate(rng.normal(0, 7), resample=Image.BICUBIC, center=(cx, cy))
    canvas.alpha_composite(layer)
    image = canvas.convert("RGB").resize((size, size), Image.LANCZOS)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(1, 6), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _render_range(folder: str, start: int, stop: int, size: int) -> None:
    for i in range(start, stop):
        render_face(i, size).save(os.path.join(folder, f"{i:06d}.jpg"), quality=92)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTGAN_CACHE") or Path.home() / ".cache" / "distgan")


def render_size(resolution: int) -> int:
    """The size the built-in faces are rendered at for training at `resolution`: 128 px serves
    every smaller resolution from one render, so resizing is always a downscale."""
    return max(128, resolution)


def builtin_faces_dir(num_images: int, size: int, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of `num_images` faces at `size` px (not necessarily rendered yet)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"faces-v{VERSION}-{size}px-{num_images}"


def ensure_builtin_faces(
    num_images: int, size: int, cache_dir: str | Path | None = None, workers: int | None = None
) -> Path:
    """Render the faces into the cache once; later calls return the folder at once.

    The files are written to a temporary folder renamed into place when complete, so an
    interrupted render is never mistaken for a dataset.
    """
    folder = builtin_faces_dir(num_images, size, cache_dir)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    workers = workers or available_cpus()
    chunk = max(1, -(-num_images // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(_render_range, str(staging), start, min(start + chunk, num_images), size)
            for start in range(0, num_images, chunk)
        ]
        for job in jobs:
            job.result()
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Render the built-in faces into the cache.")
    parser.add_argument("--num", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    print(ensure_builtin_faces(args.num, args.size, args.cache_dir))


if __name__ == "__main__":
    main()
