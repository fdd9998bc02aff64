"""FID and KID between generated images and a reference image set, computed by all processes.

Features come from torch-fidelity's FID Inception-v3 (the pytorch-fid / torch-fidelity weights,
which reproduce the original TensorFlow numbers) and FID/KID from torch-fidelity's own formulas,
so the numbers agree with that tool. Real images go through the project's DALI pipeline (the same
decode, crop and resize as training); their statistics are cached on disk, keyed by the data, the
resolution, the crop, the sample count, the decoder (CPU or GPU) and the feature extractor. A
grayscale model is scored against grayscale real images (decoded as it was trained), the one
channel repeated into the three the extractors take.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

from distgan.config.sections import EVAL_FEATURES
from distgan.data.loader import ImageLoader
from distgan.errors import UserError, first_line
from distgan.models.dcgan import sample_latents
from distgan.runtime.files import write_atomically

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub convention
KID_MAX_FEATURES = 10_000  # real features kept in the cache for KID (its subsets are 1,000)
STATS_VERSION = 2  # 2: keyed by the extractor's device and precision too


class FeatureExtractor(Protocol):
    name: str  # what produced the features, recorded with every number
    resize: str  # how images reach the extractor's input size
    numerics: str  # where and in what precision it ran: features differ slightly between them

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float [N, D]."""


class SingleProcess:
    """The `dist` of a one-process run."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def default_weights_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file, checked: torch-fidelity's cache (downloaded there if it can
    be), or `path` for offline clusters. A missing or wrong file is a one-line error."""
    if path is None:
        target = default_weights_dir() / INCEPTION_FILE
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(
                    URL_INCEPTION_V3,
                    str(target),
                    hash_prefix=INCEPTION_SHA256_PREFIX,
                    progress=False,
                )
            except Exception as err:
                reason = first_line(err, 120)
                raise UserError(
                    f"the FID Inception weights {INCEPTION_FILE} are not in {target.parent} and "
                    f"could not be downloaded ({reason}): put {URL_INCEPTION_V3} there, or pass "
                    "--inception-weights PATH"
                ) from None
    else:
        target = Path(path)
        if not target.is_file():
            raise UserError(
                f"--inception-weights {target} does not exist: download "
                f"{URL_INCEPTION_V3} and give its path"
            )
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise UserError(
            f"{target} is not the FID Inception weights (sha256 {digest[:8]}..., expected "
            f"{INCEPTION_SHA256_PREFIX}...): download {URL_INCEPTION_V3} again"
        )
    try:
        torch.load(target, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except Exception as err:
        raise UserError(
            f"{target} holds more than weights and is refused ({type(err).__name__})"
        ) from None
    return target


@contextmanager
def full_fp32():
    """Matmuls and convolutions in IEEE fp32, not TF32, then the settings as they were (torch's
    fp32_precision API only: reading the legacy allow_tf32 flags after it is an error)."""
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [knob.fp32_precision for knob in knobs]
    for knob in knobs:
        knob.fp32_precision = "ieee"
    try:
        yield
    finally:
        for knob, value in zip(knobs, before, strict=True):
            knob.fp32_precision = value


class InceptionFeatures:
    """The 2048-d pool features of the FID Inception-v3, via torch-fidelity."""

    name = "inception-v3-compat pool3 2048 (torch-fidelity)"
    resize = "bilinear to 299x299 like TensorFlow 1.x (torch-fidelity)"

    def __init__(self, weights_path: str | os.PathLike | None, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        checked = inception_weights(weights_path)  # verified: the load below is of known bytes
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(checked)
        ).to(device)
        self.device = device
        self.numerics = f"{device.type} fp32, TF32 off"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with full_fp32():  # TF32 (on by default for cuDNN convolutions) would shift FID
            return self.model(images.to(self.device))[0].double()


class PixelFeatures:
    """Images area-averaged to 8x8: a cheap extractor for smoke tests and machines without the
    Inception weights. Its FID is NOT comparable to Inception FID."""

    name = "pixels-8x8 (not comparable to Inception FID)"
    resize = "area-average to 8x8"
    numerics = "float64"  # the same on any device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.double() / 255.0, 8).flatten(1)


def make_extractor(kind: str, weights_path: str | None, device: torch.device) -> FeatureExtractor:
    if kind == "inception":
        return InceptionFeatures(weights_path, device)
    if kind == "pixels":
        return PixelFeatures()
    raise UserError(f"features={kind!r} is not allowed: use one of {', '.join(EVAL_FEATURES)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, rounded as a PNG of them would be."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def extractor_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images, RGB or gray -> uint8 [N, 3, H, W], what the extractors take: a gray
    image's one channel repeated into three (as an RGB file of it would hold)."""
    pixels = to_uint8(images)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


@dataclass
class Stats:
    """Mean and covariance of a feature set (for FID), and up to KID_MAX_FEATURES features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> Stats:
        f = features.double().cpu().numpy()
        return cls(
            f.mean(0), np.cov(f, rowvar=False), f[:KID_MAX_FEATURES].astype(np.float32), len(f)
        )


def fid(a: Stats, b: Stats) -> float:
    return fid_statistics_to_metric(
        {"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False
    )[KEY_METRIC_FID]


def kid(a: Stats, b: Stats, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets of up to 1,000 features of each set."""
    size = min(1000, len(a.features), len(b.features))
    out = kid_features_to_metric(
        torch.from_numpy(a.features),
        torch.from_numpy(b.features),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


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
) -> Stats:
    """Features of `count` images of `generator` (eval mode) from a fixed global set of z, each
    process taking every num_processes-th one."""
    seeded = torch.Generator().manual_seed(seed)
    z_all = sample_latents(generator.config, count, generator=seeded)
    mine = torch.arange(dist.process_index, count, dist.num_processes)
    per_process = -(-count // dist.num_processes)  # equal shares for the gather; pad with -1
    keys = torch.full((per_process,), -1, dtype=torch.long)
    keys[: len(mine)] = mine
    was_training = generator.training
    generator.eval()
    parts = []
    for start in range(0, per_process, batch_size):
        chunk = keys[start : start + batch_size].clamp(min=0)
        parts.append(extractor(extractor_input(generator(z_all[chunk].to(device)))))
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


def scores(real: Stats, fake: Stats) -> dict:
    kid_mean, kid_std = kid(real, fake)
    return {"fid": fid(real, fake), "kid_mean": kid_mean, "kid_std": kid_std}


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
