"""The reference training step: a plain fp32 eager DCGAN, written the way the pytorch/examples
dcgan script writes it: D ends in a sigmoid and is trained with BCELoss, its real and fake halves
get a backward pass each, G's step reuses the fake batch, and the losses are read with `.item()`
every step. It stays as it is: it is what the project is measured against, not part of it.

64x64 RGB by default (the speed benchmark); 28x28 grayscale for the digits benchmark, where G
starts from a 7x7 map and D ends on one (the shapes distgan's own models take at 28 px)."""

from __future__ import annotations

import torch
from torch import nn

Z_DIM, G_WIDTH, D_WIDTH = 100, 64, 64


def init_weights(module: nn.Module) -> None:
    """Conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0 (the DCGAN paper's init)."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def shape(resolution: int) -> tuple[int, int]:
    """(base, stages): 64 = 4 x 2^4, 28 = 7 x 2^2."""
    shapes = {64: (4, 4), 28: (7, 2)}
    if resolution not in shapes:
        raise ValueError(f"resolution={resolution}: the reference takes 64 or 28")
    return shapes[resolution]


def make_generator(channels: int = 3, resolution: int = 64) -> nn.Module:
    """z [B, 100, 1, 1] -> image [B, channels, resolution, resolution] in [-1, 1]."""
    base, stages = shape(resolution)
    widths = [G_WIDTH * 2**k for k in reversed(range(stages))]
    layers: list[nn.Module] = [nn.ConvTranspose2d(Z_DIM, widths[0], base, 1, 0, bias=False)]
    for c_in, c_out in zip(widths, widths[1:], strict=False):
        layers += [
            nn.BatchNorm2d(c_in),
            nn.ReLU(True),
            nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
        ]
    layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU(True)]
    layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def make_discriminator(channels: int = 3, resolution: int = 64) -> nn.Module:
    """image [B, channels, resolution, resolution] -> probability of being real [B, 1, 1, 1]."""
    base, stages = shape(resolution)
    widths = [D_WIDTH * 2**k for k in range(stages)]
    layers: list[nn.Module] = [
        nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, True),
    ]
    for c_in, c_out in zip(widths, widths[1:], strict=False):
        layers += [
            nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.2, True),
        ]
    layers += [nn.Conv2d(widths[-1], 1, base, 1, 0, bias=False), nn.Sigmoid()]
    return nn.Sequential(*layers)


class ReferenceDCGAN:
    """G, D, BCELoss and two Adams (lr 2e-4, betas 0.5/0.999), in fp32 on `device`."""

    def __init__(
        self, device: torch.device, seed: int = 0, channels: int = 3, resolution: int = 64
    ):
        torch.manual_seed(seed)
        self.device = device
        self.generator = make_generator(channels, resolution).to(device)
        self.discriminator = make_discriminator(channels, resolution).to(device)
        self.generator.apply(init_weights)
        self.discriminator.apply(init_weights)
        self.criterion = nn.BCELoss()
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def step(self, real: torch.Tensor) -> dict[str, float]:
        """One D update (real half, then fake half) and one G update."""
        batch = real.shape[0]
        real_label = torch.full((batch,), 1.0, device=self.device)
        fake_label = torch.full((batch,), 0.0, device=self.device)

        self.discriminator.zero_grad()
        out_real = self.discriminator(real).view(-1)
        loss_d_real = self.criterion(out_real, real_label)
        loss_d_real.backward()
        noise = torch.randn(batch, Z_DIM, 1, 1, device=self.device)
        fake = self.generator(noise)
        out_fake = self.discriminator(fake.detach()).view(-1)
        loss_d_fake = self.criterion(out_fake, fake_label)
        loss_d_fake.backward()
        self.opt_d.step()

        self.generator.zero_grad()
        out = self.discriminator(fake).view(-1)
        loss_g = self.criterion(out, real_label)
        loss_g.backward()
        self.opt_g.step()
        return {
            "loss_d": (loss_d_real + loss_d_fake).item(),
            "loss_g": loss_g.item(),
            "d_x": out_real.mean().item(),
            "d_g_z": out.mean().item(),
        }
