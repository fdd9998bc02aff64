"""GAN losses on D's logits, computed in float32 whatever the autocast dtype. Plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgan.config.choices import LOSSES


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float):
    """D's loss on one batch of real and one of fake logits (the two terms summed).

    `real_label` < 1 is one-sided label smoothing; it only applies to "bce".
    """
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        real_target = torch.full_like(real_logits, real_label)
        return F.binary_cross_entropy_with_logits(
            real_logits, real_target
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"loss={kind!r} is not allowed: use one of {', '.join(LOSSES)}")


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """G's loss: the non-saturating -log D(G(z)) for "bce", -D(G(z)) for hinge and WGAN."""
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"loss={kind!r} is not allowed: use one of {', '.join(LOSSES)}")


def class_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AC-GAN's auxiliary loss on D's reading of the labels (logits [B, K]): cross-entropy against
    class indices [B], or binary cross-entropy per attribute against multi-hot vectors [B, K]
    (so classes come as indices, as the loader gives them, not as one-hot vectors)."""
    if labels.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(class_logits.float(), labels.float())
    return F.cross_entropy(class_logits.float(), labels)


def input_gradient(
    discriminator: nn.Module,
    images: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """d sum(D(images)) / d images in float32, kept in the graph (create_graph) so that a penalty
    on it trains D. Under fp16 the gradient is taken of the *scaled* output (so it does not
    underflow) and then unscaled, as in PyTorch's AMP recipe for gradient penalties; an overflow
    makes it non-finite, and the scaler skips that step like any other overflow."""
    images = images.requires_grad_(True)
    inputs = (images,) if labels is None else (images, labels)
    output = discriminator(*inputs).float().sum()
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        output = scaler.scale(output)
    (grad,) = torch.autograd.grad(output, images, create_graph=True)
    grad = grad.float()
    if scaled:
        # scaler.scale(1) is the scale as a tensor: no host sync, unlike get_scale().
        grad = grad / scaler.scale(torch.ones((), device=grad.device))
    return grad


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    interpolates = torch.lerp(fake.detach(), real.detach(), alpha)
    grad = input_gradient(discriminator, interpolates, scaler, labels)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()


def r1_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): E[||grad_x D(x)||_2^2] at the real images D sees. It pulls
    D's gradients towards zero where the data is, which keeps D from overshooting there."""
    grad = input_gradient(discriminator, real.detach(), scaler, labels)
    return grad.square().flatten(1).sum(1).mean()
