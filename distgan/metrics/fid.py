"""FID and KID between two feature sets, with torch-fidelity's own formulas (so the numbers agree
with that tool), and the statistics of a feature set they take.

Plain numpy and torch: no DALI and no distgan data code, so that anything holding features (the
benchmarks in bench/ too) can score them. The features come from metrics/features.py, and the
statistics of real and generated images from metrics/stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

KID_MAX_FEATURES = 10_000  # real features kept in the cache for KID (its subsets are 1,000)


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


def scores(real: Stats, fake: Stats) -> dict:
    kid_mean, kid_std = kid(real, fake)
    return {"fid": fid(real, fake), "kid_mean": kid_mean, "kid_std": kid_std}
