"""Class conditioning, plain torch: labels as vectors, G's conditional BatchNorm, D's projection,
and the labels of sample grids.

A label is a class index (int64 [B], conditioning "class") or a multi-hot vector of attributes
(float [B, K], conditioning "attributes"). The gains, biases and projections are rows of a table
per layer, one row per class: a class index looks its row up, a vector sums the rows it weights
(so a one-hot vector gives its class's row). G also takes the vector beside z.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distgan.config.model import ModelConfig
from distgan.config.model import grid_rows as model_grid_rows


def check_labels(config: ModelConfig, labels: torch.Tensor) -> None:
    """Refuse labels of the wrong kind for `config`: class (or cluster) indices int [B], or
    float label vectors [B, K] (attributes, or classes made vectors)."""
    vectors = labels.dim() == 2 and labels.dtype.is_floating_point
    indexed = config.conditioning == "class" or bool(config.cluster_shares)
    if indexed and not vectors:
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(
                f"class labels must be integer indices [B], not {labels.dtype} {list(labels.shape)}"
            )
    elif not vectors or labels.shape[1] != config.label_count:
        raise ValueError(
            f"label vectors must be float [B, {config.label_count}], "
            f"not {labels.dtype} {list(labels.shape)}"
        )


def label_vectors(config: ModelConfig, labels: torch.Tensor) -> torch.Tensor:
    """Labels as float vectors [B, K]: class indices one-hot, vectors as they are."""
    check_labels(config, labels)
    if labels.dtype.is_floating_point:
        return labels
    return nn.functional.one_hot(labels.long(), config.label_count).float()


def clusters_of(z: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The cluster a self-conditioned G makes for each z [B, z_dim]: how many of the `edges`
    (ModelConfig.cluster_edges) its first coordinate exceeds, as indices int64 [B]."""
    return (z[:, :1].float() > edges).sum(dim=1)


def embed_labels(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of `table` [K, D] for labels: a row per class index (a lookup, no one-hot product,
    in the table's dtype), or the sum of the rows a label vector weights (attributes; a product,
    in autocast's dtype under autocast)."""
    if labels.dtype.is_floating_point:
        return labels.float() @ table.float()
    return nn.functional.embedding(labels.long(), table)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias depend on the label (de Vries et al. 2017; SNGAN, BigGAN):
    normalise without affine, then x * gain + bias, with the gain's deviation from 1 and the bias
    one row of `embed` per class (for attribute vectors, their sum). Without `gain`
    (ModelConfig.g_label_gain off): BatchNorm with its own affine, then the label's bias alone,
    one add where the gain takes a product and its gradients."""

    def __init__(self, num_features: int, num_classes: int, gain: bool = True):
        super().__init__()
        self.gain = gain
        self.norm = nn.BatchNorm2d(num_features, affine=not gain)
        self.embed = nn.Embedding(num_classes, (2 if gain else 1) * num_features)
        # As DCGAN's BatchNorm weights, N(1, 0.02), and its biases, 0.
        nn.init.zeros_(self.embed.weight)
        if gain:
            nn.init.normal_(self.embed.weight[:, :num_features], 0.0, 0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        rows = embed_labels(labels, self.embed.weight).to(normed.dtype)[:, :, None, None]
        if not self.gain:
            return normed + rows
        delta, bias = rows.chunk(2, dim=1)
        return Modulate.apply(normed, delta, bias)


class Modulate(torch.autograd.Function):
    """n * (1 + delta) + bias, written n + (n * delta + bias): under bf16, 1 + delta itself would
    round a class's deviation (a few hundredths) to steps of 0.4-0.8%; delta and the sum keep
    it. The backward by hand: the gradient of n as one addcmul, where autograd's two nodes take
    a product and then a sum (the conditional step's extra cost is here)."""

    @staticmethod
    def forward(ctx, normed: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(normed, delta)
        return torch.addcmul(normed + bias, normed, delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed, delta = ctx.saved_tensors
        grad_normed = torch.addcmul(grad, grad, delta)
        grad_delta = (grad * normed).sum((2, 3), keepdim=True)
        return grad_normed, grad_delta, grad.sum((2, 3), keepdim=True)


class Projection(nn.Module):
    """The projection discriminator's class term (Miyato & Koyama 2018): <embed(y), phi(x)>,
    with phi(x) D's last features summed over space (`pooled` [B, F]), added to D's
    unconditional logit. Under autocast the product runs in autocast's dtype, as D's other
    logit term (its last convolution) does."""

    def __init__(self, num_features: int, num_classes: int, spectral: bool):
        super().__init__()
        embed = nn.Embedding(num_classes, num_features)
        nn.init.xavier_uniform_(embed.weight)
        self.embed = spectral_norm(embed) if spectral else embed

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(embed_labels(labels, self.embed.weight), pooled)


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
