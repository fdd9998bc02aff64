"""The GAN being trained (G, D, their optimizers, G's EMA, the augmentation D sees) and one
training step: the D phase and the G phase, written out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from distgan.config.model import ModelConfig
from distgan.config.sections import TrainConfig
from distgan.models.augment import Augment
from distgan.models.dcgan import Discriminator, Generator, sample_latents
from distgan.models.ema import EMA
from distgan.models.losses import class_loss, d_loss, g_loss, gradient_penalty, r1_penalty

if TYPE_CHECKING:
    from distgan.outputs.pretrained import StartingWeights


class StepResult(NamedTuple):
    """What `gan_step` leaves on the device (nothing is read back: no host sync)."""

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    skipped: torch.Tensor  # 1.0 if the step was skipped for non-finite gradients, else 0.0


def nonfinite(module: torch.nn.Module) -> torch.Tensor:
    """1.0 if any gradient of `module` is inf/NaN, else 0.0, as a device tensor (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()


@dataclass(kw_only=True)
class GAN:
    """What a training step updates: G and D as prepared by Accelerate (DDP, autocast; compiled
    with --compile), their optimizers, G itself unwrapped, and G's EMA."""

    generator: torch.nn.Module
    discriminator: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generator_core: Generator
    ema: EMA
    augment: Augment  # what D sees, and ADA's p

    def set_learning_rates(self, tc: TrainConfig, scale: float) -> None:
        for optimizer, base in ((self.opt_g, tc.lr_g), (self.opt_d, tc.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = base * scale


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning rates' multiplier at `step` (0-based) of `total_steps` (lr_schedule)."""
    done = min(step / total_steps, 1.0)
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def build_gan(
    accelerator: Accelerator,
    model_cfg: ModelConfig,
    tc: TrainConfig,
    start: StartingWeights | None = None,
    *,
    images: int,
) -> GAN:
    """The same initial G and D on every process (DDP also broadcasts them), in the memory layout
    chosen, with fused Adam: one kernel per step, and it skips a step on the device when told its
    gradients are not finite (`found_inf`). `start` (--init-from): the weights G, D and the EMA
    start from instead of the init. `images`: the data set's size, which augment=auto reads."""
    set_seed(tc.seed)
    generator, discriminator = Generator(model_cfg), Discriminator(model_cfg)
    if tc.sync_bn and accelerator.num_processes > 1:
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    generator.to(memory_format=layout)
    discriminator.to(memory_format=layout)
    ema = EMA(generator, tc.ema_decay)
    ema.module.to(accelerator.device)
    if start is not None:
        start.load_into(generator, discriminator, ema.module)
        # Each process read the source itself (a run still training may have moved on between
        # reads): DDP copies G and D from process 0 in `prepare`, and the EMA is copied here.
        if accelerator.num_processes > 1:
            for tensor in [*ema.module.parameters(), *ema.module.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr_g, betas=betas, fused=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d, betas=betas, fused=True)
    prepared = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    generator, discriminator, opt_g, opt_d = prepared
    generator_core = accelerator.unwrap_model(generator)
    if tc.compile:  # around DDP, as PyTorch advises: the graph is split at gradient buckets
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    models = {"generator": generator, "discriminator": discriminator}
    strengths = dict(diff_ops=tc.diffaugment_ops, target=tc.ada_target, kimg=tc.ada_kimg)
    augment = Augment(tc.augment_for(images), **strengths, device=accelerator.device)
    return GAN(
        **models, opt_g=opt_g, opt_d=opt_d, generator_core=generator_core, ema=ema, augment=augment
    )


def judge(
    discriminator, images: torch.Tensor, labels: torch.Tensor | None, classify: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D's logits for `images`, and with `classify` (AC-GAN's head) the class loss of D's reading
    of their labels; None without."""
    if not classify:
        return discriminator(images, labels), None
    logits, classes = discriminator(images, labels, classify=True)
    return logits, class_loss(classes, labels)


def plus(loss: torch.Tensor, class_term: torch.Tensor | None) -> torch.Tensor:
    """`loss` with the class loss added, when there is one (no op on other steps)."""
    return loss if class_term is None else loss + class_term


def gan_step(
    accelerator, tc: TrainConfig, gan: GAN, real, step: int, poison=1.0, *, labels=None
) -> StepResult:
    """One D step and one G step on a batch of real images, then the EMA update: all queued on
    the device, with no host sync. `labels`: the real images' labels (None when unconditional),
    which G is asked for too, so G and D see the data's class frequencies; or, self-conditioned
    (--clusters), the real images' clusters, while G picks its images' clusters from z. With
    D's classifier head (d_classifier), each loss includes its class loss. `poison` multiplies
    the losses (NaN for fault injection)."""
    generator, discriminator = gan.generator, gan.discriminator
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    real = real.contiguous(memory_format=layout)
    config = gan.generator_core.config
    z = sample_latents(config, real.shape[0], device=real.device)
    if config.cluster_shares:
        fake, fake_labels = generator(z), gan.generator_core.clusters(z)
    else:
        fake, fake_labels = generator(z, labels), labels

    # D step: real and fake losses summed, one backward. fake is detached: no G grads. D sees
    # every image through the augmentation (none: the images themselves).
    discriminator.requires_grad_(True)
    real_seen, fake_seen = gan.augment(real), gan.augment(fake.detach())
    classify = labels is not None and config.d_classifier
    real_logits, real_class_loss = judge(discriminator, real_seen, labels, classify)
    fake_logits = discriminator(fake_seen, fake_labels)
    gan.augment.record(real_logits)
    loss_d = d_loss(tc.loss, real_logits, fake_logits, tc.real_label)
    loss_d = plus(loss_d, real_class_loss) * poison
    if tc.loss == "wgan-gp":
        # D is kept 1-Lipschitz where it is trained: between the images it sees (with the real
        # images' labels; self-conditioned, the fakes' clusters may differ, and the real ones
        # are where D's classes are anchored).
        penalty = gradient_penalty(discriminator, real_seen, fake_seen, accelerator.scaler, labels)
        loss_d = loss_d + tc.gp_weight * penalty
    regularised = loss_d  # R1 is trained on, not logged: it comes every r1_every steps only
    if tc.r1_gamma and step % tc.r1_every == 0:
        penalty = r1_penalty(discriminator, real_seen, accelerator.scaler, labels)
        regularised = loss_d + tc.r1_gamma / 2 * tc.r1_every * penalty
    gan.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(regularised)
    scaled = accelerator.scaler is not None  # fp16: the GradScaler skips overflowing steps
    if not scaled:
        bad_d = gan.opt_d.optimizer.found_inf = nonfinite(discriminator)
    gan.opt_d.step()

    # G step: D is frozen, so it collects no gradients and DDP reduces none of D's.
    discriminator.requires_grad_(False)
    g_logits, fake_class_loss = judge(discriminator, gan.augment(fake), fake_labels, classify)
    loss_g = plus(g_loss(tc.loss, g_logits), fake_class_loss) * poison
    gan.opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    if not scaled:
        bad_g = gan.opt_g.optimizer.found_inf = nonfinite(generator)
    gan.opt_g.step()
    gan.ema.update(gan.generator_core, step)
    # Under fp16 the scaler's overflow skips are routine (it finds its scale that way): only
    # non-finite losses count as skipped steps towards a rollback.
    if scaled:
        losses = torch.stack([loss_d.detach(), loss_g.detach()])
        skipped = (~torch.isfinite(losses)).any().float()
    else:
        skipped = torch.maximum(bad_d, bad_g)
    return StepResult(loss_d, loss_g, real_logits, fake_logits, skipped)
