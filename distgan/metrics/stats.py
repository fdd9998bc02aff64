"""The statistics FID and KID compare, computed by all processes: of real images (through the
training pipeline, cached on disk) and of a generator's images; and the scores of a generator.

Real images go through the project's DALI pipeline (the same decode, crop and resize as
training); their statistics are cached on disk, keyed by the data, the resolution, the crop, the
sample count, the decoder (CPU or GPU) and the feature extractor. A grayscale model is scored
against grayscale real images (decoded as it was trained).

Distributed: each process extracts features for its share of the real and generated images; the
shares are gathered and put back in one global order, so every process computes the same numbers,
whatever the number of processes. `dist` is anything with `process_index`, `num_processes` and
`gather(tensor)` (an `accelerate.Accelerator`, or `SingleProcess`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distgan.data.loader import ImageLoader
from distgan.metrics.features import FeatureExtractor, extractor_input
from distgan.metrics.fid import Stats, scores
from distgan.models.conditioning import draw_labels
from distgan.models.dcgan import sample_latents
from distgan.runtime.files import write_atomically

STATS_VERSION = 2  # 2: keyed by the extractor's device and precision too


class SingleProcess:
    """The `dist` of a one-process run."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _gather_in_order(dist, features: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather every process's features and sort them by their global `order` key; rows whose
    key is negative (padding) are dropped."""
    features = dist.gather(features.contiguous())
    order = dist.gather(order.to(features.device))
    keep = order >= 0
    return features[keep][torch.argsort(order[keep])].cpu()


def real_stats_key(
    files: list[str],
    resolution: int,
    crop_box,
    count: int,
    extractor: FeatureExtractor,
    channels: int = 3,
    decoded_on: str = "cpu",
) -> str:
    """Statistics are reused only for the same data, preparation (gray or RGB too), decoder,
    extractor, device and precision: a GPU's features differ from a CPU's in the last bits, and
    DALI's GPU JPEG decoder upsamples chroma otherwise than libjpeg-turbo (`decoded_on` "gpu")."""
    listing = [(f, os.path.getsize(f)) for f in files]
    what = [resolution, crop_box, count, extractor.name, extractor.numerics]
    what += ["gray"] if channels == 1 else []  # RGB keys as before: their caches stay valid
    what += ["decoded on gpu"] if decoded_on == "gpu" else []  # and CPU-decoded ones too
    blob = json.dumps([STATS_VERSION, listing, *what])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def real_stats_path(
    cache_dir,
    files: list[str],
    resolution: int,
    crop_box,
    extractor: FeatureExtractor,
    channels: int = 3,
    decoded_on: str = "cpu",
) -> Path:
    """Where the real statistics of `files` are cached (under cache_dir/fid-stats/)."""
    key = real_stats_key(files, resolution, crop_box, len(files), extractor, channels, decoded_on)
    return Path(cache_dir) / "fid-stats" / f"{key}.npz"


def load_stats(path: Path) -> Stats | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return Stats(data["mu"], data["sigma"], data["features"], int(data["count"]))
    except (OSError, ValueError, KeyError):
        return None  # unreadable: recompute it


def save_stats(path: Path, stats: Stats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "features": stats.features}
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays, count=stats.count))


def real_files(files: list[str], count: int | None) -> list[str]:
    """The reference images: all, or `count` of them chosen by a fixed seed (not the run's), so
    every run on this data compares against the same set."""
    if count is None or count >= len(files):
        return list(files)
    chosen = np.random.default_rng(12345).choice(len(files), count, replace=False)
    return [files[i] for i in sorted(chosen)]


def real_stats(
    dist,
    extractor: FeatureExtractor,
    files: list[str],
    *,
    resolution: int,
    crop_box,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    channels: int = 3,
) -> Stats:
    """Features of `files` through the training pipeline (no flips; gray with `channels=1`, as a
    gray model trains), sharded over processes."""
    loader = ImageLoader(
        files,
        resolution=resolution,
        batch_size=batch_size,
        shard_id=dist.process_index,
        num_shards=dist.num_processes,
        seed=0,
        channels=channels,
        crop_box=crop_box,
        flip=False,
        num_threads=num_threads,
        device_id=device_id,
    )
    indices, padding = loader.epoch_indices(0)
    keys = torch.from_numpy(np.where(padding, -1, indices))
    parts = [extractor(extractor_input(batch)) for batch in loader.epoch(0)]
    return Stats.of(_gather_in_order(dist, torch.cat(parts), keys))


@torch.no_grad()
def fake_stats(
    dist,
    extractor: FeatureExtractor,
    generator: nn.Module,
    count: int,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    label_table: torch.Tensor | None = None,
) -> Stats:
    """Features of `count` images of `generator` (eval mode) from a fixed global set of z (and,
    when conditional, labels: drawn from `label_table`, the data's, to match its class
    frequencies; see models/conditioning.py), each process taking every num_processes-th one."""
    seeded = torch.Generator().manual_seed(seed)
    z_all = sample_latents(generator.config, count, generator=seeded)
    labels_all = draw_labels(generator.config, count, generator=seeded, table=label_table)
    mine = torch.arange(dist.process_index, count, dist.num_processes)
    per_process = -(-count // dist.num_processes)  # equal shares for the gather; pad with -1
    keys = torch.full((per_process,), -1, dtype=torch.long)
    keys[: len(mine)] = mine
    was_training = generator.training
    generator.eval()
    parts = []
    for start in range(0, per_process, batch_size):
        chunk = keys[start : start + batch_size].clamp(min=0)
        inputs = [z_all[chunk].to(device)]
        if labels_all is not None:
            inputs.append(labels_all[chunk].to(device))
        parts.append(extractor(extractor_input(generator(*inputs))))
    generator.train(was_training)
    return Stats.of(_gather_in_order(dist, torch.cat(parts), keys))


def describe(
    extractor: FeatureExtractor, real: Stats, fake: Stats, resolution: int, channels: int = 3
) -> dict:
    """What every reported number states, so that numbers from two runs can be compared."""
    return {
        "n_real": real.count,
        "n_fake": fake.count,
        "resolution": resolution,
        "channels": channels,
        "resize": extractor.resize,
        "feature_extractor": extractor.name,
        "feature_numerics": extractor.numerics,
    }


def reference_stats(
    dist, extractor: FeatureExtractor, files: list[str], *, cache_dir, log=print, **pipeline
) -> Stats:
    """The real statistics of `files`: from the cache when every process finds them there, else
    computed by all processes (`pipeline`: the keyword arguments of `real_stats`) and cached by
    the main one. `log` says when they are computed."""
    resolution, crop_box = pipeline["resolution"], pipeline["crop_box"]
    channels = pipeline.get("channels", 3)
    decoded_on = "cpu" if pipeline.get("device_id") is None else "gpu"  # as ImageLoader decodes
    path = real_stats_path(cache_dir, files, resolution, crop_box, extractor, channels, decoded_on)
    stats = load_stats(path)
    found = dist.gather(torch.tensor([float(stats is not None)], device=dist.device))
    if bool(found.all()):  # all processes load them, or all compute them together
        return stats
    log(f"computing real statistics of {len(files)} images (once) ...")
    stats = real_stats(dist, extractor, files, **pipeline)
    if dist.is_main_process:
        save_stats(path, stats)
    return stats


def score(
    dist, extractor: FeatureExtractor, generator: nn.Module, real: Stats, *, count: int, **kwargs
) -> dict:
    """FID and KID of `count` images of `generator` against `real`, with what every number
    states (`describe`) and the seconds it took. `kwargs`: those of `fake_stats`."""
    start = time.perf_counter()
    fake = fake_stats(dist, extractor, generator, count, **kwargs)
    config = generator.config
    return {
        **scores(real, fake),
        **describe(extractor, real, fake, config.resolution, config.channels),
        "seconds": round(time.perf_counter() - start, 2),
    }
