"""Exponential moving average of a model's weights (for G: sharper, steadier samples)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose parameters trail the live ones: ema <- lerp(ema, live, 1-d).

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so short runs are not dominated by
    the random init. Buffers (BatchNorm statistics) are copied from the live model.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for ema_param, param in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param.detach(), weight)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
