"""Exponential moving average of a model's weights (for G: sharper, steadier samples)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from distgan.models.conditioning import draw_labels
from distgan.models.dcgan import sample_latents


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
        # One multi-tensor kernel per list instead of one small kernel per tensor.
        torch._foreach_lerp_(
            list(self.module.parameters()), list(model.parameters()), 1.0 - self.decay_at(step)
        )
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous copies (safetensors stores no strides; the model may be channels-last)."""
        return {k: v.contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


@torch.no_grad()
def recalibrate_batchnorm(generator: nn.Module, images: int = 1024, batch_size: int = 128) -> None:
    """Re-estimate G's BatchNorm running statistics for its own weights.

    The EMA copies its statistics from the live G, whose weights differ; the EMA weights see
    slightly other activations. Forward passes in train mode with a cumulative average
    (momentum None) measure them. The latents come from a generator of their own, so the
    training RNG is untouched and every call gives the same statistics for the same weights.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = next(generator.parameters()).device
    seeded = torch.Generator().manual_seed(0)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    generator.train()
    try:
        for start in range(0, images, batch_size):
            count = min(batch_size, images - start)
            z = sample_latents(generator.config, count, generator=seeded).to(device)
            labels = draw_labels(generator.config, count, generator=seeded)
            generator(z, None if labels is None else labels.to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        generator.eval()
