"""The sections of a run's configuration, by concern: data, training, outputs, evaluation and
failures (the model's is config/model.py). Each field is a flag of the same name (`batch_size` ->
`--batch-size`) documented by its docstring, with its rules beside it (config/rules.py); values
are checked in `__post_init__`, so a bad value fails before any work with a one-line message.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from distgan.config.choices import DIFF_OPS, AppliedAugment, AugmentMode, Loss, LrSchedule
from distgan.config.rules import check_fields, setting

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
EvalFeatures = Literal["inception", "pixels"]
EVAL_FEATURES = typing.get_args(EvalFeatures)
ReportTo = Literal["auto", "none", "tensorboard", "wandb", "all"]


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are prepared."""

    data_dir: str | None = setting(None, on_resume="fixed")
    """Folder of JPEG/PNG images, searched recursively (e.g. CelebA's img_align_celeba/). Unset:
    the built-in procedurally generated faces."""

    crop_box: list[int] | None = setting(None, on_resume="fixed")
    """Crop [left, top, width, height] in source pixels before resizing (e.g. CelebA's face:
    35 55 108 108). Unset: the centred largest square."""

    flip: bool | None = setting(None, on_resume="fixed")
    """Random horizontal flips. Unset: on for colour images (faces, scenes), off for grayscale
    (digits and text, which a mirror turns into other glyphs). --flip/--no-flip decide."""

    channels: Literal["auto", "1", "3"] = setting("auto", on_resume="fixed")
    """Image channels to train on: 1 (grayscale), 3 (RGB), or auto: 1 when every image in the
    folder is grayscale (read from the file headers), else 3. The built-in faces are colour;
    1 converts colour images to gray. The model is built for the resolved count."""

    num_threads: int = setting(2, positive=True)
    """DALI CPU threads per process (decode on CPU, or the host side of GPU decode)."""

    decoded_cache: Literal["auto", "off"] = setting("auto")
    """auto: when the decoded, resized images fit in memory, decode them once and serve every
    epoch from a uint8 tensor on the device (GPU memory when it fits, else host memory), with
    flips done there; otherwise stream from the files each epoch. off: always stream."""

    on_bad_image: Literal["error", "skip"] = setting("error")
    """What to do with files DALI cannot decode (corrupt, truncated, not images, unreadable,
    smaller than the crop box), found by a scan at start-up: error (stop before training, with
    the list) or skip (train on the rest)."""

    labels: str = setting("none", on_resume="fixed")
    """What to condition G and D on: none (unconditional); folders (each image's class is its
    subfolder, DIR/<class>/*.png, the ImageFolder layout); or a label file: a CSV of file,class
    rows (paths relative to data_dir), or CelebA's list_attr_celeba.txt with --attributes."""

    attributes: list[str] | None = setting(None, on_resume="fixed")
    """With CelebA's attribute list as --labels: the attributes to condition on (multi-hot, any
    subset per image), e.g. Smiling Male, or Smiling,Male."""

    clusters: int = setting(0, on_resume="fixed")
    """Self-conditioning, for unlabelled data: group the images into this many clusters by
    k-means on their pixels before training (written to OUT/clusters.csv), and condition G and
    D on them as on classes, with G picking its images' clusters from z; the generator still
    takes z alone. 0 (the default) trains unconditionally. Not with --labels."""

    on_unlabelled: Literal["error", "skip"] = setting("error")
    """Images the labels do not cover (outside any class folder, or not named in the label
    file): error (stop before training, naming them) or skip (train on the labelled ones)."""

    builtin_faces: int = setting(10_000, positive=True, on_resume="fixed")
    """How many built-in faces to render (once, then cached) when data_dir is unset."""

    cache_dir: str | None = setting(None)
    """Where the built-in faces are cached. Unset: $DISTGAN_CACHE, else ~/.cache/distgan."""

    def flips_for(self, channels: int) -> bool:
        """Whether a model of `channels` channels trains on flipped images: `flip` if set, else
        colour images only."""
        return self.flip if self.flip is not None else channels == 3

    def __post_init__(self) -> None:
        check_fields(self)
        if self.labels != "none" and self.data_dir is None:
            raise ValueError(
                f"labels={self.labels!r} needs data_dir: the built-in faces have no labels; "
                "give --data-dir with labelled images"
            )
        if self.clusters < 0 or self.clusters == 1 or isinstance(self.clusters, bool):
            raise ValueError(f"clusters={self.clusters!r} is not allowed: use 0 (off) or 2 or more")
        if self.clusters and self.labels != "none":
            raise ValueError(
                f"clusters={self.clusters} with labels={self.labels!r}: condition on the labels "
                "or on clusters, not both (drop --clusters or --labels)"
            )
        if self.attributes is not None:
            self.attributes = [a for item in self.attributes for a in str(item).split(",") if a]
            if self.labels in ("none", "folders"):
                raise ValueError(
                    "attributes need a label file: pass CelebA's list_attr_celeba.txt as --labels"
                )
        if self.crop_box is not None:
            box = list(self.crop_box)
            if len(box) != 4 or any(not isinstance(v, int) for v in box):
                raise ValueError(
                    f"crop_box={self.crop_box!r} is not allowed: give 4 integers "
                    "[left, top, width, height]"
                )
            if box[0] < 0 or box[1] < 0 or box[2] <= 0 or box[3] <= 0:
                raise ValueError(
                    f"crop_box={box} is not allowed: left/top must be >= 0, width/height > 0"
                )
            self.crop_box = box


@dataclass(kw_only=True)
class TrainConfig:
    """What the GAN learns and how: the budget, the optimisers, the loss, the augmentation, G's
    EMA, and the numerics of the step."""

    batch_size: int = setting(64, positive=True, on_resume="fixed")
    """Images per process per step; the global batch is this times the number of processes."""

    max_steps: int | None = setting(None, positive=True)
    """Stop after this many optimizer steps. Unset: train for `epochs` epochs."""

    epochs: int = setting(5, positive=True)
    """Passes over the data when max_steps is unset."""

    seed: int = setting(0, on_resume="fixed")
    """Seed of everything: data order, flips, z (offset per process), init."""

    lr_g: float = setting(2e-4, positive=True)
    """Adam learning rate of G."""

    lr_d: float = setting(2e-4, positive=True)
    """Adam learning rate of D."""

    beta1: float = setting(0.5, on_resume="fixed")
    """Adam beta1 (DCGAN: 0.5)."""

    beta2: float = setting(0.999, on_resume="fixed")
    """Adam beta2."""

    lr_schedule: LrSchedule = setting("constant")
    """The learning rates over the run: constant, or falling from lr_g and lr_d at step 0 to 0 at
    the run's last step (max_steps, or epochs x steps per epoch) along a line (linear) or a
    half cosine (cosine). A resumed run with a new budget follows the new one from where it is.
    Can change on resume."""

    loss: Loss = setting("bce", on_resume="fixed")
    """GAN loss: bce (non-saturating, with label smoothing), hinge, or wgan-gp."""

    real_label: float = setting(0.9, on_resume="fixed")
    """Target for real images in the bce loss; below 1 is one-sided label smoothing."""

    gp_weight: float = setting(10.0, positive=True, on_resume="fixed")
    """Weight of the gradient penalty with loss=wgan-gp."""

    r1_gamma: float = setting(0.0, on_resume="fixed")
    """Weight gamma of the R1 penalty, gamma / 2 * E[||grad D(real)||^2] (Mescheder et al., 2018;
    StyleGAN2's regulariser), added to D's loss every r1_every steps; 0 turns it off."""

    r1_every: int = setting(16, positive=True)
    """Steps between R1 penalties (lazy regularisation, as StyleGAN2: the penalty is weighted by
    this interval, so its strength is the same at a fraction of the cost)."""

    ema_decay: float = setting(0.999, on_resume="fixed")
    """Decay of the exponential moving average of G's weights, used for samples and export."""

    augment: AugmentMode = setting("diffaugment", before_it="none")
    """Augmentation of the images D sees, real and generated alike (differentiable, so G learns
    through it): none; diffaugment (DiffAugment: colour, translation, cutout on every image); ada
    (adaptive: flips, rotations, scaling, translation and colour changes, each applied with a
    probability p that rises while D overfits and falls while it does not; p is logged as aug_p);
    or auto: diffaugment on a data set of at most augment_auto_max images, none on a larger one.
    The default, diffaugment, was chosen on the built-in faces by `python -m bench.quality`
    (bench/README.md, "Quality"). Can change on resume."""

    augment_auto_max: int = setting(1500, positive=True)
    """With augment=auto, the most images a data set may have and still get DiffAugment. 1,500
    from real digits at 3,000 steps, where DiffAugment's distance against none's was 2.2x lower
    on 500 digits, 1.2x on 1,000, and 0.9x higher on 2,000, also at 6,000 steps (bench/README.md,
    "Fourth round: small data")."""

    diffaugment_ops: list[str] = setting(factory=lambda: list(DIFF_OPS))
    """DiffAugment's ops (augment=diffaugment, or auto on a small set): one or more of colour,
    translation, cutout (default: all three, the paper's policy for small data; bench/README.md
    compares them with translation and cutout alone). Can change on resume."""

    ada_target: float = setting(0.6)
    """ADA's target for E[sign(D(real))], the mean sign of D's logits on the real images (-1 to
    1): p rises while the mean is above it (D overfits) and falls while it is below."""

    ada_kimg: float = setting(100.0, positive=True)
    """ADA's speed: thousands of images over which p can move by 1 (StyleGAN2-ADA: 500; 100 lets
    p move within runs of a few thousand steps)."""

    mixed_precision: MixedPrecision = setting("auto", on_resume="fixed")
    """no, fp16 (CUDA only), bf16, or auto: the launcher's choice if it made one (accelerate
    launch --mixed_precision, or its config file; its default `no` is not a choice), else bf16
    where the hardware computes it natively (recent CPUs and GPUs), else no."""

    channels_last: bool = setting(True)
    """Keep G, D and the image batches in channels-last (NHWC) memory layout, which oneDNN and
    tensor-core kernels prefer (measured in bench/README.md)."""

    compile: bool = setting(False)
    """torch.compile G and D. Off by default: what it gains per step costs its compile time
    first (bench/README.md, "Where the time goes"). The first step's compile time is printed."""

    deterministic: bool = setting(False)
    """Deterministic GPU kernels (cuDNN, cuBLAS) and no cuDNN autotuning, so that on a GPU a
    resumed run matches an uninterrupted one, and cached data matches streamed, bit for bit (on
    the CPU they always do). Off: cuDNN picks the fastest kernels, whose backward is not
    deterministic."""

    sync_bn: bool = setting(False, on_resume="fixed")
    """Synchronise BatchNorm statistics across processes (SyncBatchNorm, CUDA only). Off: each
    process normalises with its own batch statistics (DDP with broadcast_buffers=False)."""

    def augment_for(self, images: int) -> AppliedAugment:
        """What D sees on a data set of `images` images: `augment`, with auto resolved."""
        if self.augment != "auto":
            return self.augment
        return "diffaugment" if images <= self.augment_auto_max else "none"

    def __post_init__(self) -> None:
        check_fields(self)
        if self.compile and self.loss == "wgan-gp":
            raise ValueError(
                "compile=True does not work with loss='wgan-gp': its gradient penalty needs a "
                "double backward, which torch.compile does not support; drop --compile or use "
                "another loss"
            )
        if not (math.isfinite(self.r1_gamma) and self.r1_gamma >= 0):
            raise ValueError(f"r1_gamma={self.r1_gamma} is not allowed: use 0 (off) or > 0")
        if self.compile and self.r1_gamma:
            raise ValueError(
                "compile=True does not work with r1_gamma > 0: the R1 penalty needs a double "
                "backward, which torch.compile does not support; drop --compile or --r1-gamma"
            )
        if self.sync_bn and self.r1_gamma:
            raise ValueError(
                "sync_bn=True does not work with r1_gamma > 0: the R1 penalty needs a double "
                "backward, which SyncBatchNorm does not have; drop --sync-bn or --r1-gamma"
            )
        if self.sync_bn and self.loss == "wgan-gp":
            raise ValueError(
                "sync_bn=True does not work with loss='wgan-gp': its gradient penalty needs a "
                "double backward, which SyncBatchNorm does not have; drop --sync-bn or use "
                "another loss"
            )
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: use 0 <= x < 1")
        if not 0.0 < self.real_label <= 1.0:
            raise ValueError(f"real_label={self.real_label} is not allowed: use 0 < x <= 1")
        ops = self.diffaugment_ops
        if not ops or len(set(ops)) != len(ops) or not set(ops) <= set(DIFF_OPS):
            raise ValueError(
                f"diffaugment_ops={ops!r} is not allowed: use one or more of "
                f"{', '.join(DIFF_OPS)}, each once"
            )
        if not -1.0 < self.ada_target < 1.0:
            raise ValueError(f"ada_target={self.ada_target} is not allowed: use -1 < x < 1")


@dataclass(kw_only=True)
class OutputsConfig:
    """Where the run lives and what it writes when: its folder, where it starts from, the metrics
    log, sample grids, checkpoints and trackers."""

    out_dir: str = setting("runs/dcgan", on_resume="not compared")
    """Output folder: samples, metrics, checkpoints, the final generator."""

    resume: str = setting("auto", on_resume="not compared")
    """auto: continue from the newest complete checkpoint in out_dir, if any; none: start fresh
    (refused if out_dir already holds checkpoints); or the path of a checkpoint folder."""

    init_from: str | None = setting(None, on_resume="fixed")
    """Start a new run from trained weights, to fine-tune them (e.g. on a new data_dir): a run
    folder or one of its checkpoints (G, D and EMA G), a Hub model folder (RUN/hub) or a Hub repo
    id user/name (G and EMA G; D fresh). The model comes from them (flags that contradict it are
    refused); optimizers and the step start afresh. A run already in out_dir resumes instead."""

    log_every: int = setting(10, positive=True)
    """Steps between lines of metrics.jsonl. The processes agree (one small collective, the
    loop's only sync with the device) at least every 10 steps and at every log step."""

    sample_every: int = setting(100, positive=True)
    """Steps between sample grids in samples/."""

    ckpt_every: int = setting(500, positive=True)
    """Steps between checkpoints (one is always written at the end)."""

    keep_checkpoints: int = setting(3, positive=True)
    """How many of the newest checkpoints to keep."""

    num_samples: int = setting(64, positive=True)
    """Images in each sample grid (fixed z, so grids are comparable across steps)."""

    report_to: ReportTo = setting("auto")
    """Experiment trackers that get every metrics line, the sample grids, FID/KID and the config
    (main process only): tensorboard (files in OUT/tensorboard/), wandb (Weights & Biases; files
    in OUT/wandb/, all of them with WANDB_MODE=offline), all (both), none, or auto: TensorBoard
    when it is installed, else none."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.resume:
            raise ValueError("resume='' is not allowed: use auto, none, or a checkpoint folder")
        if self.init_from == "":
            raise ValueError("init_from='' is not allowed: give a run, folder or Hub repo id")


@dataclass(kw_only=True)
class EvalConfig:
    """FID/KID of the EMA generator during training."""

    eval_every: int | None = setting(None, positive=True)
    """Steps between FID/KID evaluations of the EMA generator (unset: none during training)."""

    eval_num: int = setting(10_000, positive=True)
    """Generated images per evaluation (50,000 for numbers comparable with papers)."""

    eval_real_num: int | None = setting(None, positive=True)
    """Reference images for the real statistics, chosen by a fixed seed (unset: all of them).
    Computed once per dataset, resolution, crop and extractor, then cached."""

    eval_features: EvalFeatures = setting("inception")
    """Feature extractor: inception (the standard FID Inception-v3, via torch-fidelity) or pixels
    (8x8 pixel means: a smoke test, not comparable to FID)."""

    inception_weights: str | None = setting(None)
    """The FID Inception weights file, for machines without internet (checked against its
    published checksum). Unset: torch-fidelity's cache, downloaded there if possible."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(kw_only=True)
class FailuresConfig:
    """What the run does when a step or a process fails."""

    dist_timeout: int = setting(600, positive=True)
    """Seconds a collective waits for the other processes before the job fails, so a dead or
    stuck process ends the job instead of hanging it."""

    nonfinite_limit: int = setting(20, positive=True)
    """Consecutive steps with non-finite losses or gradients (each one skipped) after which the
    run rolls back or stops (on_nonfinite)."""

    on_nonfinite: Literal["rollback", "stop"] = setting("rollback")
    """rollback: resume from the last good checkpoint with learning rates x rollback_lr_factor;
    stop: end the run with a message naming the last good checkpoint."""

    rollback_lr_factor: float = setting(0.5)
    """Factor applied to both learning rates at each rollback."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ValueError(
                f"rollback_lr_factor={self.rollback_lr_factor} is not allowed: use 0 < x <= 1"
            )
