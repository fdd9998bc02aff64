"""EMA: the lerp update with its warm-up, buffers copied, the copy frozen, state round trip, and
BatchNorm statistics re-estimated for the EMA weights."""

import pytest
import torch
from torch import nn

from distgan.config.model import ModelConfig
from distgan.models.dcgan import Generator, sample_latents
from distgan.models.ema import EMA, recalibrate_batchnorm


def test_update_is_a_lerp_with_warmup():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.999)
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, step=0)
    decay = ema.decay_at(0)
    assert decay == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early steps follow the live model
    expected = start * decay + model[0].weight.detach() * (1 - decay)
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert torch.all(ema.module[1].running_mean == 3.0)
    assert ema.decay_at(10**6) == 0.999


def test_copy_is_frozen_and_round_trips():
    model = nn.Linear(3, 1)
    ema = EMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    other = EMA(nn.Linear(3, 1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.module.weight, ema.module.weight)


def test_batchnorm_recalibration_measures_the_ema_weights():
    """Re-estimated running statistics are those of the weights' own activations (the copied
    ones are replaced), the model is back in eval mode, and a second call gives the same."""
    config = ModelConfig(resolution=32, g_channels=8, d_channels=8, z_dim=16)
    generator = Generator(config).eval()
    norm = next(m for m in generator.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_mean.fill_(5.0)  # as if copied from a live G with other weights
    recalibrate_batchnorm(generator, images=256, batch_size=64)
    assert not generator.training and norm.momentum == 0.1
    first = norm.running_mean.clone()
    assert first.abs().max() < 5.0
    z = sample_latents(config, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        activations = generator.net[0](z.reshape(256, 16, 1, 1))  # what the first norm sees
    torch.testing.assert_close(first, activations.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    recalibrate_batchnorm(generator, images=256, batch_size=64)
    torch.testing.assert_close(norm.running_mean, first)
