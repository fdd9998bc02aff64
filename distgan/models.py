"""The DCGAN generator and discriminator (Radford et al., 2016). Plain torch only."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

RESOLUTIONS = (32, 64, 128, 256)


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of G and D. Stored in every checkpoint and generator file, so that a resume or
    an export rebuilds exactly the same shapes."""

    resolution: int = 64
    """Image side in pixels: a power of two from 32 to 256 (32 is the classic course setting)."""

    z_dim: int = 100
    """Length of the latent vector z, drawn from N(0, 1)."""

    g_channels: int = 64
    """Width of G: channels of its last hidden layer; earlier layers double it, up to 8x."""

    d_channels: int = 64
    """Width of D: channels of its first layer; later layers double it, up to 8x."""

    leaky_slope: float = 0.2
    """Negative slope of D's LeakyReLU."""

    d_spectral_norm: bool = False
    """Wrap every convolution of D in spectral normalisation."""

    d_dropout: float = 0.0
    """Dropout probability after each hidden block of D (0 disables it)."""

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(
                f"resolution={self.resolution} is not allowed: use a power of two from 32 to 256 "
                f"({', '.join(map(str, RESOLUTIONS))})"
            )
        for name in ("z_dim", "g_channels", "d_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: use a positive integer")
        if not 0.0 <= self.leaky_slope < 1.0:
            raise ValueError(f"leaky_slope={self.leaky_slope} is not allowed: use 0 <= slope < 1")
        if not 0.0 <= self.d_dropout < 1.0:
            raise ValueError(f"d_dropout={self.d_dropout} is not allowed: use 0 <= p < 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}: this file is from another version"
            )
        return cls(**values)

    @property
    def num_stages(self) -> int:
        """Number of 2x up-/down-sampling stages between 4x4 and the full resolution."""
        return int(math.log2(self.resolution)) - 2


def _widths(base: int, num_stages: int) -> list[int]:
    """Channel counts from the 4x4 stage outwards: base * 2^k, capped at 8 * base."""
    return [base * min(2**k, 8) for k in reversed(range(num_stages))]


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02) and bias 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z [B, z_dim] -> image [B, 3, R, R] in [-1, 1]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        widths = _widths(config.g_channels, config.num_stages)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.z_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.config.z_dim, 1, 1))


class Discriminator(nn.Module):
    """image [B, 3, R, R] -> one logit per image [B]. No sigmoid: the losses take logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        widths = list(reversed(_widths(config.d_channels, config.num_stages)))
        convs = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False)]
        convs += [
            nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)
            for c_in, c_out in zip(widths, widths[1:], strict=False)
        ]
        head = nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)
        for conv in [*convs, head]:
            init_dcgan_weights(conv)

        def maybe_sn(conv: nn.Conv2d) -> nn.Module:
            return spectral_norm(conv) if config.d_spectral_norm else conv

        layers: list[nn.Module] = []
        for i, conv in enumerate(convs):
            layers.append(maybe_sn(conv))
            if i > 0:  # DCGAN: no BatchNorm on D's input layer
                bn = nn.BatchNorm2d(conv.out_channels)
                init_dcgan_weights(bn)
                layers.append(bn)
            layers.append(nn.LeakyReLU(config.leaky_slope, inplace=True))
            if config.d_dropout > 0:
                layers.append(nn.Dropout(config.d_dropout))
        layers.append(maybe_sn(head))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(images.shape[0])
