"""The built-in default dataset: procedurally drawn faces, rendered once to JPEG files and cached.

It lets the quickstart train on a fresh machine with no download. Each face varies in head shape
and size, skin, hair (colour and style), background, clothes, eye and mouth position and shape,
eyebrows, pose (shift, roll, a hint of yaw) and sensor noise. Image i is a pure function of
(i, size), so every machine renders the same dataset.

`face_parameters(i)` is the vector of parameters face i is drawn from (`PARAMETER_NAMES`, in
`PARAMETER_GROUPS`): the ground truth of the quality benchmark (bench/quality.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from distgan.runtime.env import available_cpus
from distgan.runtime.paths import default_cache_dir

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


@dataclass(frozen=True, kw_only=True)
class Face:
    """Everything that varies between faces, as drawn from the face's own random stream. Lengths
    are in design units (the face is designed on a 256 px canvas); features are placed relative
    to the head."""

    background_top: tuple[int, int, int]
    background_bottom: tuple[int, int, int]  # the background is a vertical gradient
    head_x: float  # the head's centre, offset from the canvas centre
    head_y: float
    head_width: float  # horizontal radius of the head
    head_aspect: float  # vertical radius / horizontal radius
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    clothes: tuple[int, int, int]
    yaw: float  # -1..1: shifts the features sideways within the head
    hair_style: int  # 0 short, 1 medium, 2 long
    fringe: float  # how far the fringe comes down the forehead
    eye_height: float  # eyes above the head's centre, in vertical radii
    eye_spacing: float  # eye centre from the face's midline, in horizontal radii
    eye_width: float  # eye radius, in horizontal radii
    eye_opening: float  # eye's vertical radius, in vertical radii
    iris: tuple[int, int, int]
    gaze: float  # iris offset, in eye radii
    brow_lift: float  # brows above the eyes, in eye heights
    brow_tilt: float
    nose_length: float  # nose tip below the head's centre, in vertical radii
    nose_width: float  # in horizontal radii
    mouth_height: float  # mouth below the head's centre, in vertical radii
    mouth_width: float  # in horizontal radii
    smile: float  # the mouth's curvature: negative frowns
    lips: tuple[int, int, int]
    teeth: bool  # an open smile
    roll: float  # rotation of the face, degrees
    blur: float  # Gaussian blur radius in output pixels (0: none)
    noise: float  # standard deviation of the sensor noise, in 8-bit levels


def sample_face(rng: np.random.Generator) -> Face:
    """A face's parameters from its random stream (which then draws the sensor noise). The
    arguments are evaluated in the order written, and that order is the dataset: keep it."""
    return Face(
        background_top=tuple(int(c) for c in rng.integers(30, 230, 3)),
        background_bottom=tuple(int(c) for c in rng.integers(30, 230, 3)),
        head_x=rng.normal(0, 8),
        head_y=rng.normal(6, 8),
        head_width=rng.uniform(64, 88),
        head_aspect=rng.uniform(1.15, 1.4),
        skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 10),
        hair=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 12),
        clothes=tuple(int(c) for c in rng.integers(0, 256, 3)),
        yaw=rng.uniform(-1, 1),
        hair_style=int(rng.integers(3)),
        fringe=rng.uniform(0.45, 0.8),
        eye_height=rng.uniform(0.02, 0.16),
        eye_spacing=rng.uniform(0.36, 0.48),
        eye_width=rng.uniform(0.15, 0.22),
        eye_opening=rng.uniform(0.06, 0.1),
        iris=_jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10),
        gaze=rng.uniform(-0.35, 0.35),
        brow_lift=rng.uniform(1.6, 2.6),
        brow_tilt=rng.uniform(-0.25, 0.25),
        nose_length=rng.uniform(0.2, 0.3),
        nose_width=rng.uniform(0.1, 0.18),
        mouth_height=rng.uniform(0.48, 0.62),
        mouth_width=rng.uniform(0.28, 0.5),
        smile=(smile := rng.uniform(-0.3, 1.0)),
        lips=_jitter(rng, (170, 70, 70), 20),
        teeth=bool(smile > 0.6 and rng.random() < 0.5),  # a draw only for broad smiles
        roll=rng.normal(0, 7),
        blur=rng.uniform(0.3, 0.8) if rng.random() < 0.3 else 0.0,
        noise=rng.uniform(1, 6),
    )


# Which part of the picture each parameter describes (the groups a feature network is judged by).
PARAMETER_GROUPS = {
    "background": ("background_top", "background_bottom"),
    "head": ("head_x", "head_y", "head_width", "head_aspect"),
    "skin": ("skin",),
    "hair": ("hair", "hair_style", "fringe"),
    "clothes": ("clothes",),
    "eyes": ("eye_height", "eye_spacing", "eye_width", "eye_opening", "iris", "gaze"),
    "brows": ("brow_lift", "brow_tilt"),
    "nose": ("nose_length", "nose_width"),
    "mouth": ("mouth_height", "mouth_width", "smile", "lips", "teeth"),
    "pose": ("yaw", "roll"),
    "camera": ("blur", "noise"),
}


def _expand(name: str) -> list[str]:
    """A parameter's entries in the vector: a colour's r, g and b, else the parameter itself."""
    is_colour = Face.__dataclass_fields__[name].type.startswith("tuple")  # a string: annotations
    return [f"{name}_{c}" for c in "rgb"] if is_colour else [name]


# The entries of `face_parameters`' vector: colours split into their r, g, b.
PARAMETER_NAMES = tuple(
    entry for names in PARAMETER_GROUPS.values() for name in names for entry in _expand(name)
)
# The group of each entry of PARAMETER_NAMES.
PARAMETER_NAME_GROUPS = tuple(
    group for group, names in PARAMETER_GROUPS.items() for name in names for _ in _expand(name)
)
# A mirrored face is the face with these parameters negated (the others are symmetric).
MIRRORED_PARAMETERS = ("head_x", "yaw", "gaze", "roll")


def face_parameters(index: int) -> np.ndarray:
    """Face number `index`'s parameters as a float64 vector, ordered as PARAMETER_NAMES (the
    same for every rendering size)."""
    face = sample_face(np.random.default_rng([VERSION, index]))
    values = [getattr(face, name) for names in PARAMETER_GROUPS.values() for name in names]
    return np.array([v for value in values for v in np.ravel(value)], dtype=np.float64)


def render_face(index: int, size: int = 128) -> Image.Image:
    """Draw face number `index` as an RGB image of `size` x `size` pixels."""
    rng = np.random.default_rng([VERSION, index])
    face = sample_face(rng)
    s = size * SUPERSAMPLE
    u = s / 256  # drawing units: the face is designed on a 256 px canvas

    top, bottom = np.array(face.background_top), np.array(face.background_bottom)
    ramp = np.linspace(0, 1, s)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(s, axis=1).astype(np.uint8)
    canvas = Image.fromarray(background).convert("RGBA")

    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx = s / 2 + face.head_x * u
    cy = s / 2 + face.head_y * u
    rx = face.head_width * u
    ry = rx * face.head_aspect
    skin, hair = face.skin, face.hair
    shade = tuple(int(c * 0.82) for c in skin)
    fx = cx + face.yaw * rx * 0.18

    # Shoulders and neck, then long hair behind the head.
    _ellipse(draw, cx, cy + ry * 1.75, rx * 2.0, ry * 0.75, face.clothes + (255,))
    draw.rectangle([cx - rx * 0.35, cy + ry * 0.6, cx + rx * 0.35, cy + ry * 1.15], fill=shade)
    if face.hair_style > 0:
        length = ry * (0.6 if face.hair_style == 1 else 1.3)
        hair_box = [cx - rx * 1.15, cy - ry * 0.7, cx + rx * 1.15, cy + length]
        draw.rounded_rectangle(hair_box, radius=int(rx * 0.5), fill=hair)
    _ellipse(draw, cx, cy - ry * 0.12, rx * 1.1, ry * 1.02, hair)

    # Ears, head.
    for side in (-1, 1):
        _ellipse(draw, cx + side * rx * 0.97, cy + ry * 0.02, rx * 0.16, ry * 0.17, shade)
    _ellipse(draw, cx, cy, rx, ry, skin)

    # Fringe over the forehead.
    fringe_bottom = cy - ry * (1.05 - 1.2 * face.fringe)
    draw.chord([cx - rx * 1.02, cy - ry * 1.05, cx + rx * 1.02, fringe_bottom], 180, 360, fill=hair)

    # Eyes, irises, pupils, eyebrows.
    eye_y = cy - ry * face.eye_height
    eye_dx = rx * face.eye_spacing
    eye_rx, eye_ry = rx * face.eye_width, ry * face.eye_opening
    gaze = face.gaze * eye_rx
    for side in (-1, 1):
        ex = fx + side * eye_dx
        _ellipse(draw, ex, eye_y, eye_rx, eye_ry, (245, 245, 240))
        _ellipse(draw, ex + gaze, eye_y, eye_ry * 0.95, eye_ry * 0.95, face.iris)
        _ellipse(draw, ex + gaze, eye_y, eye_ry * 0.45, eye_ry * 0.45, (10, 10, 10))
        by = eye_y - eye_ry * face.brow_lift
        tilt = side * face.brow_tilt * eye_ry * 2
        brow = [ex - eye_rx * 1.1, by + tilt, ex + eye_rx * 1.1, by - tilt]
        draw.line(brow, fill=hair, width=max(1, int(ry * 0.045)))

    # Nose.
    nose_y = cy + ry * face.nose_length
    nose_w = rx * face.nose_width
    draw.polygon([(fx, eye_y + eye_ry), (fx - nose_w, nose_y), (fx + nose_w, nose_y)], fill=shade)

    # Mouth: a chord whose curvature is the smile; sometimes open.
    mouth_y = cy + ry * face.mouth_height
    mouth_w = rx * face.mouth_width
    smile = face.smile
    height = ry * 0.12 * abs(smile) + ry * 0.03
    box = [fx - mouth_w, mouth_y - height, fx + mouth_w, mouth_y + height]
    draw.chord(box, 0 if smile >= 0 else 180, 180 if smile >= 0 else 360, fill=face.lips)
    if face.teeth:
        inner = [
            fx - mouth_w * 0.7,
            mouth_y - height * 0.3,
            fx + mouth_w * 0.7,
            mouth_y + height * 0.7,
        ]
        draw.chord(inner, 0, 180, fill=(250, 250, 250))

    layer = layer.rotate(face.roll, resample=Image.BICUBIC, center=(cx, cy))
    canvas.alpha_composite(layer)
    image = canvas.convert("RGB").resize((size, size), Image.LANCZOS)
    if face.blur:
        image = image.filter(ImageFilter.GaussianBlur(face.blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, face.noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_range(folder: str, start: int, stop: int, size: int) -> None:
    """Faces start..stop-1 into `folder` as the built-in set's JPEG files (`NNNNNN.jpg`)."""
    for i in range(start, stop):
        render_face(i, size).save(os.path.join(folder, f"{i:06d}.jpg"), quality=92)


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
            pool.submit(render_range, str(staging), start, min(start + chunk, num_images), size)
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
