"""The digits benchmark's scores of a set of 28 px grayscale images against real digits.

- FD: the Fréchet distance (FID's formula, `metrics.fid.fid`) between Gaussians fitted to the
  digit scorer's penultimate features (bench/digit_scorer.py) of the images and of the reference
  digits. Lower is better; every set scored has the same count, as FD depends on it.
- class entropy: the entropy of the scorer's mean class distribution over the images; ln 10 =
  2.303 when all ten digits are made equally often, lower when some are missing.
- confidence: the scorer's mean top-class probability: near 1 for legible digits.
- coverage (Naeem et al., 2020) in the scorer's features: the share of reference digits with an
  image within their k-nearest-neighbour radius (bench/quality_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.digit_scorer import RESOLUTION, DigitNet, features_and_probabilities
from bench.quality_metrics import NEAREST, coverage
from distgan.data.folder import find_images
from distgan.errors import UserError
from distgan.metrics.fid import Stats, fid


def load_digit_folder(folder: str | Path) -> torch.Tensor:
    """uint8 [N, 1, 28, 28] of a folder of 28 px grayscale images (flat, or one subfolder per
    class), ordered by file name so that both layouts of mnist_folder.py give the same order."""
    files = sorted(find_images(folder), key=lambda path: (Path(path).name, path))
    images = []
    for path in files:
        with Image.open(path) as image:
            if image.size != (RESOLUTION, RESOLUTION):
                raise UserError(
                    f"{path} is {image.size[0]}x{image.size[1]}: the digits benchmark takes "
                    f"{RESOLUTION}x{RESOLUTION} digits (mnist_folder.py writes them)"
                )
            images.append(np.asarray(image.convert("L")))
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def blurred(images: torch.Tensor) -> torch.Tensor:
    """uint8 images through a 3x3 box filter (edges padded by replication), rounded."""
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 3, 1).round().to(torch.uint8)


def entropy(probabilities: torch.Tensor) -> float:
    """Entropy (nats) of the mean of per-image class distributions."""
    mean = probabilities.double().mean(0)
    return float(-(mean * mean.clamp_min(1e-12).log()).sum())


@dataclass
class DigitReference:
    """The reference digits as the scores see them: their feature statistics and the features
    of the first `coverage_count` (coverage's neighbourhoods)."""

    net: DigitNet
    stats: Stats
    coverage_features: torch.Tensor

    @classmethod
    def of(cls, net: DigitNet, images: torch.Tensor, coverage_count: int) -> DigitReference:
        features, _ = features_and_probabilities(net, images)
        return cls(net, Stats.of(features), features[:coverage_count])

    def score(self, images: torch.Tensor) -> dict:
        """{fd, entropy, confidence, coverage, classes} of uint8 images [N, 1, 28, 28]."""
        features, probabilities = features_and_probabilities(self.net, images)
        counts = torch.bincount(probabilities.argmax(1), minlength=probabilities.shape[1])
        return {
            "fd": fid(self.stats, Stats.of(features)),
            "entropy": entropy(probabilities),
            "confidence": float(probabilities.max(1).values.double().mean()),
            "coverage": coverage(self.coverage_features, features, NEAREST),
            "classes": counts.tolist(),
        }
