"""The quality benchmark's feature network: a small CNN that reads the built-in faces' drawing
parameters (faces.PARAMETER_NAMES: colours, head and feature geometry, pose, camera) back
from a 32 px image. Its penultimate layer is the feature space the benchmark measures distances
in; its predictions are the parameter space it measures coverage in.

No Inception weights can be downloaded here, and these faces need none: what varies between them
is known exactly, so a network trained to recover it has features that mean something for this
data. It is trained offline (`python -m bench.quality --train-features`) on faces the benchmark
never uses (numbers 10,000 to 29,999, rendered like the built-in ones), judged on built-in faces
it never saw, and committed as `quality_features.safetensors` with `quality_features.json`
(how well it predicts each parameter group, R^2 on held-out faces).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distgan.data.faces import (
    MIRRORED_PARAMETERS,
    PARAMETER_GROUPS,
    PARAMETER_NAME_GROUPS,
    PARAMETER_NAMES,
    VERSION,
    default_cache_dir,
    ensure_builtin_faces,
    face_parameters,
    render_range,
    render_size,
)
from distgan.data.folder import find_images
from distgan.data.loader import ImageLoader
from distgan.errors import UserError
from distgan.runtime.env import available_cpus

RESOLUTION = 32
FEATURES = 128  # width of the penultimate layer: the feature vector
WEIGHTS_FILE = Path(__file__).resolve().with_name("quality_features.safetensors")
RECORD_FILE = WEIGHTS_FILE.with_suffix(".json")
TRAIN_FACES = range(10_000, 30_000)  # past the built-in set: never seen by the benchmark
HELD_OUT_FACES = 2_000  # built-in faces 0.. : the R^2 is measured on the benchmark's own data
EPOCHS = 24
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
SEED = 0


class FaceParameterNet(nn.Module):
    """uint8 RGB images [N, 3, 32, 32] -> the faces' parameters, normalised (zero mean, unit
    variance over its training faces). `features` is the penultimate layer."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, 32, 3, 2),  # 16x16
            *block(32, 64, 3, 2),  # 8x8
            *block(64, 128, 3, 2),  # 4x4
            *block(128, 32, 1, 1),  # fewer channels: the flattened map stays small
            nn.Flatten(),
        )
        self.embed = nn.Linear(32 * 4 * 4, FEATURES)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, len(PARAMETER_NAMES)))
        self.register_buffer("parameter_mean", torch.zeros(len(PARAMETER_NAMES)))
        self.register_buffer("parameter_std", torch.ones(len(PARAMETER_NAMES)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, 32, 32] -> float [N, FEATURES] (before the last ReLU)."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, RESOLUTION, RESOLUTION):
            raise ValueError(
                f"expected uint8 images [N, 3, {RESOLUTION}, {RESOLUTION}], got "
                f"{images.dtype} {list(images.shape)}"
            )
        unit = (images.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        return self.embed(self.trunk(unit))  # channels-last: oneDNN's faster convolutions

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def normalise(self, parameters: torch.Tensor) -> torch.Tensor:
        return (parameters - self.parameter_mean) / self.parameter_std


def load_net(path: str | Path = WEIGHTS_FILE) -> FaceParameterNet:
    """The committed feature network, in eval mode (safetensors: tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: train it with `python -m bench.quality --train-features`"
        )
    net = FaceParameterNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def load_images(files: list[str], resolution: int = RESOLUTION) -> torch.Tensor:
    """uint8 [N, 3, R, R] of `files`, in order, through the training pipeline (DALI decode of the
    centred square, antialiased resize; no flips): what the GAN is trained on."""
    loader = ImageLoader(
        files,
        resolution=resolution,
        batch_size=256,
        shard_id=0,
        num_shards=1,
        seed=0,
        flip=False,
        num_threads=available_cpus(),
        decoded_cache="auto",
    )
    cache = loader.build_cache()
    if cache is None:
        raise UserError(f"{len(files)} images at {resolution} px do not fit in memory")
    return cache.permute(0, 3, 1, 2).contiguous()


def render_faces(faces: range, cache_dir: str | Path | None = None) -> Path:
    """Faces `faces` rendered as the built-in ones are (same size and JPEG quality) into a cache
    folder, once; the folder is renamed into place when complete."""
    size = render_size(RESOLUTION)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"faces-v{VERSION}-{size}px-from-{faces.start}-to-{faces.stop}"
    if folder.is_dir():
        return folder
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    chunk = 250
    with ProcessPoolExecutor(available_cpus()) as pool:
        jobs = [
            pool.submit(render_range, str(staging), i, min(i + chunk, faces.stop), size)
            for i in range(faces.start, faces.stop, chunk)
        ]
        for job in jobs:
            job.result()
    staging.rename(folder)
    return folder


def parameters_of(faces: range) -> torch.Tensor:
    """The raw parameter vectors of faces `faces`, float32 [N, len(PARAMETER_NAMES)]."""
    return torch.from_numpy(np.stack([face_parameters(i) for i in faces])).float()


def mirror(parameters: torch.Tensor) -> torch.Tensor:
    """The parameters of the mirrored faces (raw units): the sideways ones change sign."""
    mirrored = parameters.clone()
    for name in MIRRORED_PARAMETERS:
        mirrored[:, PARAMETER_NAMES.index(name)] *= -1
    return mirrored


def r_squared(predicted: torch.Tensor, target: torch.Tensor) -> dict:
    """R^2 of each parameter and of each group (1 - residual / total variance, summed over the
    group's normalised parameters) of `predicted` against `target`."""
    residual = ((predicted - target) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0)
    names = np.array(PARAMETER_NAMES)
    groups = np.array(PARAMETER_NAME_GROUPS)
    per_parameter = dict(zip(names, (1 - residual / total).tolist(), strict=True))
    per_group = {}
    for group in PARAMETER_GROUPS:
        mine = torch.from_numpy(groups == group)
        per_group[group] = 1 - float(residual[mine].sum() / total[mine].sum())
    return {"groups": per_group, "parameters": per_parameter}


@torch.no_grad()
def predict(net: FaceParameterNet, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Normalised parameters predicted for uint8 images [N, 3, 32, 32] (eval mode)."""
    return torch.cat([net(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def features(net: FaceParameterNet, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features of uint8 images [N, 3, 32, 32] (eval mode)."""
    parts = [net.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


@contextmanager
def deterministic(seed: int):
    """Seeded, deterministic kernels for the block, the global settings restored after it."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(was)


def fit(net: FaceParameterNet, images: torch.Tensor, raw: torch.Tensor, epochs: int, log) -> float:
    """Train `net` to predict the normalised parameters `raw` of `images` (uint8), each batch
    half mirrored (images and parameters both); the last epoch's mean loss."""
    both = torch.cat([raw, mirror(raw)])
    net.parameter_mean.copy_(both.mean(0))
    net.parameter_std.copy_(both.std(0).clamp(min=1e-6))
    targets, mirrored = net.normalise(raw), net.normalise(mirror(raw))
    steps_per_epoch = math.ceil(len(images) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    warm = steps_per_epoch  # one epoch of linear warm-up, then a cosine to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * s / total))),
    )
    order = torch.Generator().manual_seed(SEED)
    net.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        flipped = torch.rand(len(images), generator=order) < 0.5
        losses = []
        for first in range(0, len(images), BATCH_SIZE):
            batch = permutation[first : first + BATCH_SIZE]
            flip = flipped[batch]
            x = torch.where(flip[:, None, None, None], images[batch].flip(3), images[batch])
            y = torch.where(flip[:, None], mirrored[batch], targets[batch])
            loss = torch.nn.functional.mse_loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        log(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")
    net.eval()
    return float(np.mean(losses))


def train_features(
    *,
    cache_dir: str | Path | None = None,
    faces: range = TRAIN_FACES,
    held_out: int = HELD_OUT_FACES,
    epochs: int = EPOCHS,
    out: Path = WEIGHTS_FILE,
    log=print,
) -> dict:
    """Train the feature network from scratch (seeded, deterministic kernels: the same machine
    and thread count give the same weights), write it to `out` and its record (R^2 on the first
    `held_out` built-in faces, per group and per parameter) next to it; return the record."""
    start = time.perf_counter()
    log(f"rendering faces {faces.start}..{faces.stop - 1} for training (once) ...")
    images = load_images(find_images(render_faces(faces, cache_dir)))
    held_folder = ensure_builtin_faces(held_out, render_size(RESOLUTION), cache_dir)
    held_images = load_images(find_images(held_folder))
    with deterministic(SEED):
        net = FaceParameterNet().to(memory_format=torch.channels_last)
        loss = fit(net, images, parameters_of(faces), epochs, log)
    held_raw = parameters_of(range(held_out))
    quality = r_squared(predict(net, held_images), net.normalise(held_raw))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata={"parameters": json.dumps(PARAMETER_NAMES)})
    record = {
        "what": "R^2 of the predicted parameters on held-out faces (built-in faces "
        f"0..{held_out - 1}; trained on faces {faces.start}..{faces.stop - 1})",
        "r2_groups": {k: round(v, 4) for k, v in quality["groups"].items()},
        "r2_parameters": {k: round(v, 4) for k, v in quality["parameters"].items()},
        "train_faces": [faces.start, faces.stop],
        "held_out_faces": held_out,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "final_train_loss": round(loss, 5),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
