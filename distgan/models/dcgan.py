"""The DCGAN generator and discriminator (Radford et al., 2016). Plain torch only."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distgan.config.model import Init, ModelConfig
from distgan.models.conditioning import (
    ConditionalBatchNorm2d,
    Projection,
    check_labels,
    clusters_of,
    label_vectors,
)


def _widths(base: int, num_stages: int) -> list[int]:
    """Channel counts from the base x base stage outwards: base * 2^k, capped at 8 * base."""
    return [base * min(2**k, 8) for k in reversed(range(num_stages))]


def init_weights(module: nn.Module, init: Init = "normal") -> None:
    """Conv weights N(0, 0.02) (DCGAN) or Xavier/Glorot uniform; BatchNorm weight N(1, 0.02) and
    bias 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        if init == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def sample_latents(
    config: ModelConfig,
    count: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`count` latents [count, z_dim] from the model's z distribution: N(0, 1), or U[-1, 1].
    `generator` must live on `device` (draw on the CPU and move, for the same z everywhere)."""
    shape, where = (count, config.z_dim), {"device": device, "generator": generator}
    if config.z_distribution == "uniform":
        return torch.rand(shape, **where).mul_(2).sub_(1)
    return torch.randn(shape, **where)


def _check_labels(conditioned_on: str | None, labels: torch.Tensor | None, who: str) -> None:
    """Labels given exactly when `who` is conditioned on something (named, else None)."""
    if conditioned_on and labels is None:
        raise ValueError(f"{who} is conditional ({conditioned_on}): pass labels")
    if not conditioned_on and labels is not None:
        raise ValueError(f"{who} is unconditional: pass no labels")


class Generator(nn.Module):
    """z [B, z_dim] (and, when conditional, labels: class indices [B] or multi-hot attributes
    [B, K]) -> image [B, C, R, R] in [-1, 1] (C = config.channels). A conditional G has
    conditional BatchNorm where the unconditional one has BatchNorm. A self-conditioned G
    (config.cluster_shares) takes z alone: it reads the cluster from z (`clusters`) and is
    conditioned on it as on a class."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Derived from the config, not trained: kept out of the weights files.
        edges = torch.tensor(config.cluster_edges(), dtype=torch.float32)
        self.register_buffer("cluster_edges", edges, persistent=False)

        def norm(channels: int) -> nn.Module:
            if config.label_count:
                return ConditionalBatchNorm2d(channels, config.label_count, config.g_label_gain)
            return nn.BatchNorm2d(channels)

        widths = _widths(config.g_channels, config.num_stages)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(
                config.z_dim + config.label_count, widths[0], config.base, 1, 0, bias=False
            ),
            norm(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                norm(c_out),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(lambda module: init_weights(module, config.init))

    def clusters(self, z: torch.Tensor) -> torch.Tensor:
        """The cluster indices [B] a self-conditioned G makes for `z`."""
        return clusters_of(z, self.cluster_edges)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # A self-conditioned G reads its clusters from z: it takes no labels.
        conditioned_on = self.config.conditioning if self.config.classes else None
        _check_labels(conditioned_on, labels, "G")
        return self.synthesize(z, self.clusters(z) if self.config.cluster_shares else labels)

    def synthesize(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The images for `z` and the labels (or clusters) G is conditioned on, unchecked."""
        x = z.reshape(z.shape[0], self.config.z_dim, 1, 1)
        if labels is None:
            return self.net(x)
        label_vector = label_vectors(self.config, labels)
        x = torch.cat([x, label_vector.to(x.dtype)[:, :, None, None]], dim=1)
        for layer in self.net:
            conditional = isinstance(layer, ConditionalBatchNorm2d)
            x = layer(x, labels) if conditional else layer(x)
        return x

    @classmethod
    def from_pretrained(cls, folder_or_repo_id, *, revision: str | None = None) -> Generator:
        """G in eval mode from a distgan model folder (a run's hub/) or a Hugging Face Hub repo
        id holding one (downloaded and cached); see distgan/outputs/model_folder.py."""
        # Here, not at the top: this module stays plain torch (model_folder imports no models).
        from distgan.outputs.model_folder import read_model_folder

        files = read_model_folder(folder_or_repo_id, revision=revision)
        generator = cls(files.config)
        files.load_into(generator)
        return generator.eval().requires_grad_(False)


class Discriminator(nn.Module):
    """image [B, C, R, R] (and, when conditional, labels as G's) -> one logit per image [B]. No
    sigmoid: the losses take logits. A conditional D adds the projection term to its logit."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        widths = list(reversed(_widths(config.d_channels, config.num_stages)))
        convs = [nn.Conv2d(config.channels, widths[0], 4, 2, 1, bias=False)]
        convs += [
            nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)
            for c_in, c_out in zip(widths, widths[1:], strict=False)
        ]
        head = nn.Conv2d(widths[-1], 1, config.base, 1, 0, bias=False)
        for conv in [*convs, head]:
            init_weights(conv, config.init)

        def maybe_sn(conv: nn.Conv2d) -> nn.Module:
            return spectral_norm(conv) if config.d_spectral_norm else conv

        layers: list[nn.Module] = []
        for i, conv in enumerate(convs):
            layers.append(maybe_sn(conv))
            if i > 0:  # DCGAN: no BatchNorm on D's input layer
                bn = nn.BatchNorm2d(conv.out_channels)
                init_weights(bn)
                layers.append(bn)
            layers.append(nn.LeakyReLU(config.leaky_slope, inplace=True))
            if config.d_dropout > 0:
                layers.append(nn.Dropout(config.d_dropout))
        layers.append(maybe_sn(head))
        self.net = nn.Sequential(*layers)
        if config.label_count:
            self.projection = Projection(widths[-1], config.label_count, config.d_spectral_norm)
            if config.d_classifier:
                self.classifier = nn.Linear(widths[-1], config.label_count)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, *, classify: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits [B]; with `classify` (a D with a classifier head), also its reading of
        the images' labels: logits [B, K] of their classes (or attributes)."""
        config = self.config
        conditioned_on = config.conditioning if config.classes else None
        if config.cluster_shares:
            conditioned_on = "clusters"
        _check_labels(conditioned_on, labels, "D")
        if classify and not hasattr(self, "classifier"):
            raise ValueError("D has no classifier head: build it with d_classifier and labels")
        if labels is None:
            return self.net(images).reshape(images.shape[0])
        check_labels(self.config, labels)
        *body, head = self.net
        features = images
        for layer in body:
            features = layer(features)
        logits = head(features).reshape(images.shape[0]).float()
        # Summed once for the projection and the classifier: a second sum's gradient, added to
        # the head's, took the backward off channels-last (+1 ms a D pass at 28 px on 2 cores).
        pooled = features.sum(dim=(2, 3)).float()
        logits = logits + self.projection(pooled, labels)
        if classify:
            return logits, self.classifier(pooled)
        return logits
