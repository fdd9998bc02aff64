"""Training-step figures: the reference loop against the project's step (`gan_step`
on G and D built by `build_gan`, the trainer's own code) in each precision and
layout, plus FLOP counts and a profile."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from bench.reference_dcgan import ReferenceDCGAN
from bench.timing import synchronize
from distgan.config.config import load_toml, make_config
from distgan.config.model import ModelConfig
from distgan.config.sections import TrainConfig
from distgan.training.gan import build_gan, gan_step

RESOLUTION = 64
DIGITS_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "mnist28.toml"
# Set by the bench itself, not by a recipe: what the step runs in and on.
BENCH_FIELDS = ("batch_size", "mixed_precision", "channels_last", "compile")
DATA_IMAGES = 10_000  # the data set size augment=auto reads: the course's 10,000 digits


def fresh_accelerator(mixed_precision: str, device: torch.device) -> Accelerator:
    """An Accelerator of the given precision. Accelerate keeps one state per process and refuses
    a second precision, so it is started anew for each variant (as Accelerate's own tests do);
    variants built earlier keep their autocast wrappers and scalers."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def real_batch(
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    resolution: int = RESOLUTION,
    channels: int = 3,
) -> torch.Tensor:
    """Random images in [-1, 1] laid out as each loader delivers them: DALI's NHWC seen as NCHW
    for the project, contiguous NCHW (DataLoader) for the reference."""
    images = torch.rand(batch_size, resolution, resolution, channels, device=device) * 2 - 1
    images = images.permute(0, 3, 1, 2)
    return images if channels_last else images.contiguous()


class ReferenceRun:
    """The pytorch/examples-style loop, fp32 eager."""

    precision = "no"

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size, self.device = batch_size, device
        self.model = ReferenceDCGAN(device)
        self.real = real_batch(batch_size, device, channels_last=False)

    def step(self) -> None:
        self.model.step(self.real)  # reads its losses with .item(): it waits for the device

    def steps(self, count: int) -> int:
        for _ in range(count):
            self.step()
        synchronize(self.device)
        return count * self.batch_size


class TrainerRun:
    """The project's training step with one choice of precision, layout and compilation."""

    def __init__(
        self,
        batch_size: int,
        device: torch.device,
        *,
        precision: str,
        channels_last: bool,
        compile: bool,
        model: ModelConfig | None = None,
        train_options: dict | None = None,
    ):
        """`model`: the shapes (default: 64x64 RGB); `train_options`: other TrainConfig fields
        (default: the trainer's defaults)."""
        self.batch_size, self.device, self.precision = batch_size, device, precision
        self.accelerator = fresh_accelerator(precision, device)
        options = dict(mixed_precision=precision, channels_last=channels_last, compile=compile)
        self.config = TrainConfig(batch_size=batch_size, **options, **(train_options or {}))
        model = model or ModelConfig(resolution=RESOLUTION)
        self.gan = build_gan(self.accelerator, model, self.config, images=DATA_IMAGES)
        self.real = real_batch(
            batch_size,
            device,
            channels_last=True,
            resolution=model.resolution,
            channels=model.channels,
        )
        # A conditional (or self-conditioned) model's labels: every class (cluster), as a batch
        # of the data would hold them.
        classes = torch.arange(batch_size) % max(1, model.label_count)
        self.labels = classes.to(device) if model.label_count else None
        self.step_index = 0
        self.last = None

    def step(self) -> None:
        self.last = gan_step(
            self.accelerator, self.config, self.gan, self.real, self.step_index, labels=self.labels
        )
        self.step_index += 1

    def steps(self, count: int) -> int:
        for _ in range(count):
            self.step()
        self.last[1].item()  # the trainer's only kind of sync: a log step reading the losses
        synchronize(self.device)
        return count * self.batch_size


def warm_up(run, steps: int = 2) -> float:
    """Run the first steps (compilation, allocator, algorithm choice); seconds they took."""
    start = time.perf_counter()
    run.steps(steps)
    return time.perf_counter() - start


def flops_per_image(run) -> float:
    """FLOPs of one training step per image, as torch.utils.flop_counter counts them (matmuls
    and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run.step()
    synchronize(run.device)
    return counter.get_total_flops() / run.batch_size


def top_ops(run, steps: int, limit: int = 12) -> list[dict]:
    """The ops with the most self time over `steps` steps (CUDA time on a GPU)."""
    on_gpu = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        run.steps(steps)
    events = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:limit]
    return [
        {
            "op": e.key,
            "ms_per_step": round(getattr(e, key) / 1000 / steps, 3),
            "percent": round(100 * getattr(e, key) / total, 1),
            "calls_per_step": e.count // steps,
        }
        for e in ranked
    ]


def recipe_steps(batch_size: int, device: torch.device, precision: str) -> dict:
    """The step of each kind of data's recipe next to the step of the trainer's defaults at the
    same shapes: 28 px grayscale digits (launch/configs/mnist28.toml: self-conditioned on its
    clusters, with D's classifier head; the same G and D without clusters or head; and
    class-conditional on the ten digits with that G and head, as mnist28-classes.toml trains
    them, its other settings aside: spectral norm and the loss are not the labels' cost) and 64
    px RGB faces (the defaults themselves, which are the faces' recipe: timed twice, their
    spread is the noise)."""
    digits = make_config(load_toml(DIGITS_RECIPE))
    recipe = {
        f.name: getattr(digits.train, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in digits.given and f.name not in BENCH_FIELDS
    }
    # The clusters' count as the recipe sets it (their shares, which the data gives, cost nothing).
    clusters = [1 / digits.data.clusters] * digits.data.clusters
    gray = dataclasses.replace(digits.model, channels=1, cluster_shares=clusters)
    ten = [str(d) for d in range(10)]
    plain = dataclasses.replace(gray, cluster_shares=[], d_classifier=False)
    labelled = dataclasses.replace(gray, cluster_shares=[], conditioning="class", classes=ten)
    shapes = {
        "28 px gray, defaults": (ModelConfig(resolution=28, channels=1), {}),
        "28 px gray, mnist28.toml": (gray, recipe),
        "28 px gray, mnist28.toml without clusters or head": (plain, recipe),
        "28 px gray, mnist28.toml, 10 classes": (labelled, recipe),
        "64 px RGB, defaults": (ModelConfig(resolution=64), {}),
        "64 px RGB, defaults again": (ModelConfig(resolution=64), {}),
        "64 px RGB, defaults, 10 classes": (
            ModelConfig(resolution=64, conditioning="class", classes=ten),
            {},
        ),
    }
    return {
        name: TrainerRun(
            batch_size,
            device,
            precision=precision,
            channels_last=True,
            compile=False,
            model=model,
            train_options=options,
        )
        for name, (model, options) in shapes.items()
    }
