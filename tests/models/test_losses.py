"""Losses: each formula on known logits, label smoothing, the WGAN-GP penalty (its value on a D
with a known gradient, and the same value through an fp16 loss scaler), R1 likewise, and the
AC-GAN class loss for class indices and attribute vectors."""

import math

import pytest
import torch
from torch import nn

from distgan.models.losses import class_loss, d_loss, g_loss, gradient_penalty, r1_penalty


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_known_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    # BCE(x, t) = softplus(x) - t * x, averaged.
    expected_real = sum(softplus(x) - 0.9 * x for x in (2.0, -1.0)) / 2
    expected_fake = sum(softplus(x) for x in (0.5, -3.0)) / 2
    assert d_loss("bce", real, fake, 0.9).item() == pytest.approx(expected_real + expected_fake)
    expected_g = sum(softplus(x) - x for x in (0.5, -3.0)) / 2  # non-saturating: -log sigmoid
    assert g_loss("bce", fake).item() == pytest.approx(expected_g)


def test_label_smoothing_changes_only_the_real_term():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0])
    difference = d_loss("bce", real, fake, 1.0) - d_loss("bce", real, fake, 0.9)
    assert difference.item() == pytest.approx(-0.1 * real.mean().item())


def test_hinge_and_wgan_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert d_loss("hinge", real, fake, 0.9).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert g_loss("hinge", fake).item() == pytest.approx(1.0)
    assert d_loss("wgan-gp", real, fake, 0.9).item() == pytest.approx(-1.0 - 1.25)
    assert g_loss("wgan-gp", fake).item() == pytest.approx(1.0)


def test_losses_are_float32_from_bf16_logits():
    logits = torch.tensor([1.0, -1.0], dtype=torch.bfloat16)
    assert d_loss("bce", logits, logits, 0.9).dtype == torch.float32
    assert g_loss("hinge", logits).dtype == torch.float32


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="loss='lsgan'"):
        d_loss("lsgan", torch.zeros(1), torch.zeros(1), 0.9)


class Linear(nn.Module):
    """D(x) = <w, x>: its input gradient is w for every sample, so the penalty is (|w| - 1)^2."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_known_value_and_gradient_flow():
    w = torch.full((1, 3, 4, 4), 0.5)  # |w| = 0.5 * sqrt(48)
    critic = Linear(w)
    penalty = gradient_penalty(critic, torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4))
    assert penalty.item() == pytest.approx((0.5 * math.sqrt(48) - 1) ** 2, rel=1e-5)
    penalty.backward()  # double backward reaches D's weights
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_gradient_penalty_through_a_loss_scaler_matches_unscaled():
    critic = Linear(torch.randn(1, 3, 4, 4) * 0.1)
    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    torch.manual_seed(0)
    plain = gradient_penalty(critic, real, fake)
    torch.manual_seed(0)
    scaled = gradient_penalty(critic, real, fake, scaler)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


def test_r1_penalty_known_value_gradient_flow_and_scaler():
    # D(x) = <w, x> has input gradient w at every image: R1 = |w|^2, its gradient in w is 2w.
    w = torch.full((1, 3, 4, 4), 0.5)
    critic = Linear(w.clone())
    penalty = r1_penalty(critic, torch.randn(5, 3, 4, 4))
    assert penalty.item() == pytest.approx(0.25 * 48, rel=1e-6)
    penalty.backward()
    assert torch.allclose(critic.w.grad, 2 * w)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert r1_penalty(critic, torch.randn(5, 3, 4, 4), scaler).item() == pytest.approx(12.0)


def test_class_loss_reads_indices_as_classes_and_vectors_as_attributes():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    picked = class_loss(logits, torch.tensor([0, 2]))
    log_softmax = torch.log_softmax(logits.float(), dim=1)
    expected = -(log_softmax[0, 0] + log_softmax[1, 2]) / 2
    assert picked.dtype == torch.float32 and torch.isclose(picked, expected)
    attributes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    each = [softplus(-2.0), softplus(0.0), softplus(1.0), softplus(0.0), softplus(1.0), softplus(0)]
    assert math.isclose(class_loss(logits, attributes).item(), sum(each) / 6, rel_tol=1e-6)
