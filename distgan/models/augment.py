"""Discriminator augmentation: what D sees of the real and generated images. Plain torch.

- DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
  colour (brightness, saturation, contrast), translation by up to 1/8 of the image with zero
  fill, and cutout of a square half the image's side, on every image D sees; a policy picks
  which of the three (the paper's: all).
- ADA (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data"): each
  of xflip, rotate90, integer translation, isotropic scale, rotation, anisotropic scale,
  fractional translation, brightness, contrast, luma flip, hue rotation and saturation applied
  to each image with probability p. The geometric ones compose into one affine matrix per image,
  applied by one `grid_sample` with reflection padding; the colour ones into one 4x4 matrix per
  image. `Augment.adjust` steers p so that D's real logits are positive a target fraction of
  the time (the paper's r_t heuristic).

Every op is batched, drawn per image, differentiable (G's gradients go through it), and runs on
the images' device. Randomness comes from `generator` (same generator state and p, same ops),
or, with none given, from torch's default generator, which the trainer seeds per process and
checkpoints. Images are [B, C, H, W] with C = 1 or 3, in [-1, 1]; on one channel only
brightness, contrast and the geometric ops apply. The result has the input's dtype and memory
format; the arithmetic is float32 whatever the autocast.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F

from distgan.config.choices import APPLIED_AUGMENTS, DIFF_OPS, AppliedAugment

DIFF_TRANSLATION = 1 / 8  # of the image size
DIFF_CUTOUT = 1 / 2

# ADA's strengths: stylegan2-ada-pytorch's AugmentPipe defaults for its 'bgc' pipeline.
ADA_XINT_MAX = 0.125  # integer translation, of the image size
ADA_SCALE_STD = 0.2  # log2 of the isotropic scale
ADA_ROTATE_MAX = 1.0  # of pi
ADA_ANISO_STD = 0.2  # log2 of the anisotropic scale
ADA_XFRAC_STD = 0.125  # fractional translation, of the image size
ADA_BRIGHTNESS_STD = 0.2
ADA_CONTRAST_STD = 0.5  # log2
ADA_HUE_MAX = 1.0  # of pi
ADA_SATURATION_STD = 1.0  # log2


def _float32(images: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format]:
    """The images in float32, and the memory format to give the result back in."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"augmentation needs [B, 1 or 3, H, W] images, got {list(images.shape)}")
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    return images.float(), torch.channels_last if channels_last else torch.contiguous_format


class _Draws:
    """Random numbers per image, on the images' device, from one generator (or torch's own)."""

    def __init__(self, batch: int, device: torch.device, generator: torch.Generator | None):
        self.batch, self.device, self.generator = batch, device, generator

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(self.batch, *shape, device=self.device, generator=self.generator)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.batch, *shape, device=self.device, generator=self.generator)

    def integers(self, low: int, high: int) -> torch.Tensor:
        """[B] integers in [low, high)."""
        size = (self.batch,)
        return torch.randint(low, high, size, device=self.device, generator=self.generator)

    def chosen(self, probability: float) -> torch.Tensor:
        """[B] booleans: which images get an op applied with `probability`."""
        return self.uniform() < probability


def diff_augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    ops: Collection[str] = DIFF_OPS,
) -> torch.Tensor:
    """DiffAugment's ops (`ops`: some of colour, translation, cutout, applied in that order),
    as in the authors' code."""
    x, layout = _float32(images)
    batch, channels, height, width = x.shape
    draw = _Draws(batch, x.device, generator)
    if "colour" in ops:
        x = x + (draw.uniform(1, 1, 1) - 0.5)
        if channels == 3:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (draw.uniform(1, 1, 1) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (draw.uniform(1, 1, 1) + 0.5) + mean
    if "translation" in ops:  # by whole pixels; what comes in is zero (mid-grey)
        shift_y = int(height * DIFF_TRANSLATION + 0.5)
        shift_x = int(width * DIFF_TRANSLATION + 0.5)
        dy, dx = draw.integers(-shift_y, shift_y + 1), draw.integers(-shift_x, shift_x + 1)
        padded = F.pad(x, (1, 1, 1, 1))  # index 0 and size+1 read the zero border
        rows = (torch.arange(height, device=x.device) + dy[:, None] + 1).clamp(0, height + 1)
        cols = (torch.arange(width, device=x.device) + dx[:, None] + 1).clamp(0, width + 1)
        padded = padded.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width + 2))
        x = padded.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))
    if "cutout" in ops:  # a square of half the side set to zero, its centre anywhere
        size_y, size_x = int(height * DIFF_CUTOUT + 0.5), int(width * DIFF_CUTOUT + 0.5)
        top = draw.integers(0, height + (1 - size_y % 2)) - size_y // 2
        left = draw.integers(0, width + (1 - size_x % 2)) - size_x // 2
        row = torch.arange(height, device=x.device)[None, :] - top[:, None]
        col = torch.arange(width, device=x.device)[None, :] - left[:, None]
        inside_rows, inside_cols = (row >= 0) & (row < size_y), (col >= 0) & (col < size_x)
        keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    return x.to(images.dtype).contiguous(memory_format=layout)


def _matrices(rows: list[list], like: torch.Tensor) -> torch.Tensor:
    """[B, n, n] from rows of per-image [B] tensors and plain numbers, `like` a [B] float32
    tensor on the device (numbers become fills there: no host-to-device copy, no sync)."""
    entries = [e if torch.is_tensor(e) else torch.full_like(like, e) for row in rows for e in row]
    return torch.stack(entries, dim=1).reshape(-1, len(rows), len(rows))


def _translate2d(tx, ty):
    return _matrices([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx, sy):
    return _matrices([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(theta):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrices([[c, -s, 0], [s, c, 0], [0, 0, 1]], c)


def _ada_geometry(draw: _Draws, p: float, height: int, width: int) -> torch.Tensor:
    """[B, 3, 3]: output -> input coordinates in grid_sample's [-1, 1] units, the inverse of the
    geometric ops chosen for each image (stylegan2-ada's order and distributions)."""
    batch, device = draw.batch, draw.device
    sample_from = torch.eye(3, device=device).expand(batch, 3, 3)
    zero, one = torch.zeros(batch, device=device), torch.ones(batch, device=device)
    # xflip.
    flip = torch.where(draw.chosen(p), draw.integers(0, 2).float(), zero)
    sample_from = sample_from @ _scale2d(1 - 2 * flip, one)
    # rotate90.
    quarter = torch.where(draw.chosen(p), draw.integers(0, 4).float(), zero)
    sample_from = sample_from @ _rotate2d(math.pi / 2 * quarter)
    # Integer translation: whole pixels, so no resampling blur.
    shift = (draw.uniform(2) * 2 - 1) * ADA_XINT_MAX
    shift = torch.where(draw.chosen(p)[:, None], shift, 0.0)
    pixels_x, pixels_y = torch.round(shift[:, 0] * width), torch.round(shift[:, 1] * height)
    sample_from = sample_from @ _translate2d(-2 * pixels_x / width, -2 * pixels_y / height)
    # Isotropic scale.
    scale = torch.where(draw.chosen(p), torch.exp2(draw.normal() * ADA_SCALE_STD), one)
    sample_from = sample_from @ _scale2d(1 / scale, 1 / scale)
    # Rotation before and after the anisotropic scale, each with the probability that makes
    # "at least one of the two" happen with probability p.
    p_rotate = 1 - math.sqrt(max(0.0, 1 - p))
    theta = torch.where(draw.chosen(p_rotate), (draw.uniform() * 2 - 1) * math.pi, zero)
    sample_from = sample_from @ _rotate2d(-theta * ADA_ROTATE_MAX)
    aniso = torch.where(draw.chosen(p), torch.exp2(draw.normal() * ADA_ANISO_STD), one)
    sample_from = sample_from @ _scale2d(1 / aniso, aniso)
    theta = torch.where(draw.chosen(p_rotate), (draw.uniform() * 2 - 1) * math.pi, zero)
    sample_from = sample_from @ _rotate2d(-theta * ADA_ROTATE_MAX)
    # Fractional translation.
    shift = torch.where(draw.chosen(p)[:, None], draw.normal(2) * ADA_XFRAC_STD, 0.0)
    sample_from = sample_from @ _translate2d(-2 * shift[:, 0], -2 * shift[:, 1])
    return sample_from


def _circulant(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] homogeneous colour matrices with the 3x3 part [[a, b, c], [c, a, b], [b, c, a]]:
    the form that the maps about the grey axis below take."""
    return _matrices([[a, b, c, 0], [c, a, b, 0], [b, c, a, 0], [0, 0, 0, 1]], a)


def _ada_colour(draw: _Draws, p: float, channels: int) -> torch.Tensor:
    """[B, 4, 4]: the colour ops chosen for each image, composed (homogeneous RGB). The maps about
    the grey axis v = (1, 1, 1) / sqrt(3) are written out (v v^T is 1/3 everywhere)."""
    batch, device = draw.batch, draw.device
    zero, one = torch.zeros(batch, device=device), torch.ones(batch, device=device)
    brightness = torch.where(draw.chosen(p), draw.normal() * ADA_BRIGHTNESS_STD, zero)
    contrast = torch.where(draw.chosen(p), torch.exp2(draw.normal() * ADA_CONTRAST_STD), one)
    b, c = brightness, contrast  # brightness first, then contrast: c * (x + b)
    colour = _matrices([[c, 0, 0, c * b], [0, c, 0, c * b], [0, 0, c, c * b], [0, 0, 0, 1]], c)
    if channels == 1:
        return colour
    # Luma flip: the Householder reflection I - 2 v v^T through the plane normal to grey.
    flip = torch.where(draw.chosen(p), draw.integers(0, 2).float(), zero)
    colour = _circulant(1 - 2 * flip / 3, -2 * flip / 3, -2 * flip / 3) @ colour
    # Hue: rotation about the grey axis, cos I + sin [v]x + (1 - cos) v v^T (Rodrigues).
    theta = torch.where(draw.chosen(p), (draw.uniform() * 2 - 1) * math.pi * ADA_HUE_MAX, zero)
    cos, sin = torch.cos(theta), torch.sin(theta) / math.sqrt(3)
    colour = _circulant(cos + (1 - cos) / 3, (1 - cos) / 3 - sin, (1 - cos) / 3 + sin) @ colour
    # Saturation: v v^T + s (I - v v^T) scales the distance from the grey axis.
    saturation = torch.where(draw.chosen(p), torch.exp2(draw.normal() * ADA_SATURATION_STD), one)
    return (
        _circulant(1 / 3 + 2 * saturation / 3, (1 - saturation) / 3, (1 - saturation) / 3) @ colour
    )


def ada_augment(
    images: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ADA's geometric and colour pipeline, each op applied to each image with probability p.
    p = 0 returns `images` itself (no random numbers drawn)."""
    if p <= 0:
        return images
    x, layout = _float32(images)
    batch, channels, height, width = x.shape
    draw = _Draws(batch, x.device, generator)
    with torch.autocast(x.device.type, enabled=False):
        sample_from = _ada_geometry(draw, p, height, width)
        grid = F.affine_grid(sample_from[:, :2], [batch, channels, height, width], False)
        x = F.grid_sample(x, grid, "bilinear", "reflection", align_corners=False)
        colour = _ada_colour(draw, p, channels)
        if channels == 3:
            x = torch.einsum("bij,bjhw->bihw", colour[:, :3, :3], x)
        else:
            x = x * colour[:, :1, :1, None]
        x = x + colour[:, :channels, 3, None, None]
    return x.to(images.dtype).contiguous(memory_format=layout)


class Augment:
    """What D sees (`mode`: none, diffaugment or ada), and ADA's probability p with its
    controller: the signs of D's logits on the real images are summed on the device at every
    step (no host sync) until a gate step reads them, in the processes' one collective, and
    `adjust` moves p from those agreed sums, so p is the same on every process."""

    def __init__(
        self,
        mode: AppliedAugment,
        *,
        diff_ops: Collection[str] = DIFF_OPS,
        target: float = 0.6,
        kimg: float = 100.0,
        device: torch.device | str = "cpu",
    ):
        if mode not in APPLIED_AUGMENTS:  # auto is resolved by TrainConfig.augment_for
            raise ValueError(f"augment mode {mode!r}: use one of {', '.join(APPLIED_AUGMENTS)}")
        self.mode, self.diff_ops, self.target, self.kimg = mode, tuple(diff_ops), target, kimg
        self.p = 0.0
        self.real_sign_sum = torch.zeros((), device=device)
        self.real_count = 0  # logits summed into real_sign_sum

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "diffaugment":
            return diff_augment(images, ops=self.diff_ops)
        if self.mode == "ada":
            return ada_augment(images, self.p)
        return images

    def record(self, real_logits: torch.Tensor) -> None:
        """Add one step's logits on (augmented) real images to the sums (ada only)."""
        if self.mode == "ada":
            self.real_sign_sum += torch.sign(real_logits.detach().float()).sum()
            self.real_count += real_logits.numel()

    def counts(self) -> list[torch.Tensor]:
        """[sum of sign(D(real)), how many] since the last adjust, for the gate's collective."""
        return [self.real_sign_sum, torch.full_like(self.real_sign_sum, self.real_count)]

    def adjust(self, real_sign_sum: float, real_count: int) -> None:
        """ADA's update from the sums over all processes: p moves up while E[sign(D(real))]
        exceeds the target (D overfits), down while below it, by count / (kimg * 1000), so it
        can cross [0, 1] in kimg thousand images."""
        if self.mode == "ada" and real_count > 0:
            overfitting = real_sign_sum / real_count
            direction = (overfitting > self.target) - (overfitting < self.target)
            step = direction * real_count / (self.kimg * 1000)
            self.p = min(1.0, max(0.0, self.p + step))
        self.restore(self.p)  # the next window's sums start from zero

    def restore(self, p: float) -> None:
        """Go on from a checkpoint's p, with the sums started afresh."""
        self.p = p
        self.real_sign_sum.zero_()
        self.real_count = 0

    def metrics(self) -> dict[str, float]:
        """What a metrics.jsonl line reports: p under ada (DiffAugment has no strength)."""
        return {"aug_p": self.p} if self.mode == "ada" else {}
