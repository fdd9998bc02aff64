"""EMA: the lerp update with its warm-up, buffers copied, the copy frozen, state round trip."""

import pytest
import torch
from torch import nn

from distgan.ema import EMA


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
