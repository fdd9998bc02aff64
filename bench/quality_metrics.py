"""The quality benchmark's two scores of a set of images against the reference faces.

- FD: the Fréchet distance (FID's formula, `metrics.fid.fid`) between Gaussians fitted to the
  feature network's penultimate-layer features of the images and of the reference faces. Lower
  is better; it sees both fidelity and variety, and like FID it depends on the sample count, so
  every set scored here has the same count.
- coverage (Naeem et al., 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models"): in the space of predicted face parameters (normalised), the share of reference faces
  whose neighbourhood (the ball reaching their k-th nearest reference neighbour) holds at least one
  of the images. 1 means the images spread over every kind of face the reference has; a generator
  that makes only some kinds of faces (mode collapse, or copies of a few training faces) leaves
  the rest uncovered. Parameters the network cannot see are predicted close to their mean, so
  they add little to the distances. Two sets of real faces score about 0.97 with k = 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.quality_features import FaceParameterNet, features, predict
from distgan.metrics.fid import Stats, fid

NEAREST = 5  # k of coverage's neighbourhoods, as Naeem et al.


def coverage(reference: torch.Tensor, candidates: torch.Tensor, k: int = NEAREST) -> float:
    """Share of `reference` points with a `candidates` point within their k-NN radius."""
    reference, candidates = reference.double(), candidates.double()
    radius = torch.cdist(reference, reference).kthvalue(k + 1, dim=1).values  # +1: itself
    nearest = torch.cdist(reference, candidates).min(dim=1).values
    return float((nearest <= radius).double().mean())


@dataclass
class Reference:
    """The reference faces as the scores see them: their feature statistics (all of them) and
    the predicted parameters of the first `coverage_count` (coverage's neighbourhoods)."""

    net: FaceParameterNet
    stats: Stats
    parameters: torch.Tensor

    @classmethod
    def of(cls, net: FaceParameterNet, images: torch.Tensor, coverage_count: int) -> Reference:
        stats = Stats.of(features(net, images))
        return cls(net, stats, predict(net, images[:coverage_count]))

    def score(self, images: torch.Tensor) -> dict:
        """{"fd", "coverage"} of uint8 images [N, 3, 32, 32] against the reference."""
        distance = fid(self.stats, Stats.of(features(self.net, images)))
        return {"fd": distance, "coverage": coverage(self.parameters, predict(self.net, images))}
