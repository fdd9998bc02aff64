"""Data figures: the project's DALI pipeline (streaming, and from the decoded-image cache) against
a plain torchvision ImageFolder + DataLoader doing the same work with as many workers."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.timing import synchronize
from distgan.data.folder import find_images
from distgan.data.loader import ImageLoader, dali_device_id

CELEBA_SIZE = (178, 218)  # width, height of CelebA's aligned images


def make_celeba_like_folder(folder: Path, count: int, seed: int = 0) -> tuple[list[str], float]:
    """`count` JPEGs the size of CelebA's aligned faces and about their file size (~16 KB: smooth
    colour fields plus sensor-like noise), in folder/faces/ (ImageFolder wants a class folder).
    Returns the files and their mean size in KiB."""
    images = folder / "faces"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = CELEBA_SIZE
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(smooth + rng.normal(0, 11, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(images / f"{i:06d}.jpg", quality=90)
    files = find_images(folder)
    return files, float(np.mean([Path(f).stat().st_size for f in files]) / 1024)


def torchvision_loader(folder: Path, resolution: int, batch_size: int, workers: int, device):
    """ImageFolder + DataLoader: PIL decode, resize of the shorter side, centre crop, flip,
    normalise to [-1, 1]; shuffled; persistent workers (kinder to it than the default)."""
    steps = [
        transforms.Resize(resolution, antialias=True),
        transforms.CenterCrop(resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ]
    dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    loading = dict(num_workers=workers, persistent_workers=True, pin_memory=device.type == "cuda")
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, **loading)


def data_work(
    folder: Path, *, resolution: int, batch_size: int, workers: int, device: torch.device
) -> tuple[dict, float]:
    """({name: one-epoch work function}, seconds the cache took to build) for the images in
    `folder`. Every loader delivers float batches on `device`, as training consumes them."""
    files = find_images(folder)
    one_process = dict(shard_id=0, num_shards=1, seed=0, device_id=dali_device_id(device))
    common = dict(resolution=resolution, batch_size=batch_size, num_threads=workers, **one_process)
    streaming = ImageLoader(files, decoded_cache="off", **common)
    cached = ImageLoader(files, decoded_cache="auto", **common)
    start = time.perf_counter()
    if cached.build_cache() is None:
        raise RuntimeError("the benchmark's images do not fit in memory for the decoded cache")
    synchronize(device)
    build_seconds = time.perf_counter() - start
    reference = torchvision_loader(folder, resolution, batch_size, workers, device)
    epochs = itertools.count()

    def run_torchvision() -> int:
        count = 0
        for images, _ in reference:
            images = images.to(device, non_blocking=True)
            count += images.shape[0]
        synchronize(device)
        return count

    def dali_epoch(loader: ImageLoader):
        def run() -> int:
            count = sum(batch.shape[0] for batch in loader.epoch(next(epochs)))
            synchronize(device)
            return count

        return run

    work = {
        "torchvision": run_torchvision,
        "dali": dali_epoch(streaming),
        "dali_cached": dali_epoch(cached),
    }
    for run in work.values():
        run()  # warm-up: worker start-up, pipeline build, first allocations
    return work, build_seconds
