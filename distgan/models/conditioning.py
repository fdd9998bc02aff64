"""Class conditioning, plain torch: labels as vectors, G's conditional BatchNorm, D's projection,
and the labels of sample grids.

A label is a class index (int64 [B], conditioning "class") or a multi-hot vector of attributes
(float [B, K], conditioning "attributes"). Both become a vector [B, K], one-hot or multi-hot,
which linear maps turn into per-channel gains, biases and projections (for a one-hot vector that
is an embedding lookup).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distgan.config.model import ModelConfig
from distgan.config.model import grid_rows as model_grid_rows


def label_vectors(config: ModelConfig, labels: torch.Tensor) -> torch.Tensor:
    """Labels as float vectors [B, K]: class indices one-hot, vectors (attributes, or classes
    made vectors already, once for a training step's several passes) as they are."""
    vectors = labels.dim() == 2 and labels.dtype.is_floating_point
    if config.conditioning == "class" and not vectors:
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(
                f"class labels must be integer indices [B], not {labels.dtype} {list(labels.shape)}"
            )
        return nn.functional.one_hot(labels.long(), config.num_classes).float()
    if not vectors or labels.shape[1] != config.num_classes:
        raise ValueError(
            f"label vectors must be float [B, {config.num_classes}], "
            f"not {labels.dtype} {list(labels.shape)}"
        )
    return labels


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias depend on the label (de Vries et al. 2017; SNGAN, BigGAN):
    normalise without affine, then x * (1 + delta) + bias, with [delta, bias] = y W for the
    label vector y (one linear map for both: one product a layer)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.affine = nn.Linear(num_classes, 2 * num_features, bias=False)
        # As DCGAN's BatchNorm weights, N(1, 0.02), and its biases, 0.
        nn.init.normal_(self.affine.weight[:num_features], 0.0, 0.02)
        nn.init.zeros_(self.affine.weight[num_features:])

    def forward(self, x: torch.Tensor, label_vector: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        delta, bias = self.affine(label_vector).to(normed.dtype)[:, :, None, None].chunk(2, dim=1)
        # n * (1 + delta) + bias as n + (n * delta + bias): under bf16 autocast, 1 + delta itself
        # would round away most of a class's deviation (a few hundredths); delta and the sum
        # keep it, at bf16's relative precision, with no float32 copy of the activations.
        return torch.addcmul(normed + bias, normed, delta)


class Projection(nn.Module):
    """The projection discriminator's class term (Miyato & Koyama 2018): <embed(y), phi(x)>,
    with phi(x) D's last features summed over space, added to D's unconditional logit."""

    def __init__(self, num_features: int, num_classes: int, spectral: bool):
        super().__init__()
        embed = nn.Linear(num_classes, num_features, bias=False)
        nn.init.xavier_uniform_(embed.weight)
        self.embed = spectral_norm(embed) if spectral else embed

    def forward(self, features: torch.Tensor, label_vector: torch.Tensor) -> torch.Tensor:
        pooled = features.sum(dim=(2, 3)).float()
        return (self.embed(label_vector.float()) * pooled).sum(dim=1)


def grid_rows(config: ModelConfig) -> tuple[list[str], torch.Tensor]:
    """(row names, labels) of a sample grid (config/model.py's grid_rows): class indices [R], or
    multi-hot attributes [R, K]."""
    rows = model_grid_rows(config.conditioning, config.classes)
    labels = [label for _, label in rows]
    dtype = torch.int64 if config.conditioning == "class" else torch.float32
    return [name for name, _ in rows], torch.tensor(labels, dtype=dtype)


def draw_labels(
    config: ModelConfig,
    count: int,
    *,
    generator: torch.Generator | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`count` labels on the CPU, None when unconditional: rows of `table` (the data's labels)
    drawn uniformly, so with the data's class frequencies; without one, uniform classes or
    fair-coin attributes."""
    if not config.classes:
        return None
    if table is not None:
        return table.cpu()[torch.randint(len(table), (count,), generator=generator)]
    if config.conditioning == "class":
        return torch.randint(config.num_classes, (count,), generator=generator)
    return torch.randint(2, (count, config.num_classes), generator=generator).float()
