"""Training configuration: documented dataclasses, a TOML file, and command-line flags over it.

Precedence: dataclass defaults < `--config FILE.toml` < flags. Every field is a flag of the same
name (`batch_size` -> `--batch-size`), documented by the field's docstring. Values are checked in
`__post_init__`, so a bad value fails before any work with a one-line message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomli_w

from distgan.config.choices import DIFF_OPS, AugmentMode, Loss, LrSchedule
from distgan.config.model import ModelConfig
from distgan.errors import UserError
from distgan.runtime.files import write_text_atomically

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
EvalFeatures = Literal["inception", "pixels"]
EVAL_FEATURES = typing.get_args(EvalFeatures)
ReportTo = Literal["auto", "none", "tensorboard", "wandb", "all"]


def _require_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: use a finite number > 0")


def _choices(hint) -> tuple | None:
    """The allowed values of a Literal[...] field (also inside `X | None`), else None."""
    base, _ = _base_type(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _require_choices(obj) -> None:
    """Every Literal field holds one of its values: one check for all of them."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        allowed, value = _choices(hint), getattr(obj, name)
        if allowed and value not in allowed and value is not None:
            listed = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
            raise ValueError(f"{name}={value!r} is not allowed: use {listed}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are prepared."""

    data_dir: str | None = None
    """Folder of JPEG/PNG images, searched recursively (e.g. CelebA's img_align_celeba/). Unset:
    the built-in procedurally generated faces."""

    crop_box: list[int] | None = None
    """Crop [left, top, width, height] in source pixels before resizing (e.g. CelebA's face:
    35 55 108 108). Unset: the centred largest square."""

    flip: bool | None = None
    """Random horizontal flips. Unset: on for colour images (faces, scenes), off for grayscale
    (digits and text, which a mirror turns into other glyphs). --flip/--no-flip decide."""

    channels: Literal["auto", "1", "3"] = "auto"
    """Image channels to train on: 1 (grayscale), 3 (RGB), or auto: 1 when every image in the
    folder is grayscale (read from the file headers), else 3. The built-in faces are colour;
    1 converts colour images to gray. The model is built for the resolved count."""

    num_threads: int = 2
    """DALI CPU threads per process (decode on CPU, or the host side of GPU decode)."""

    decoded_cache: Literal["auto", "off"] = "auto"
    """auto: when the decoded, resized images fit in memory, decode them once and serve every
    epoch from a uint8 tensor on the device (GPU memory when it fits, else host memory), with
    flips done there; otherwise stream from the files each epoch. off: always stream."""

    on_bad_image: Literal["error", "skip"] = "error"
    """What to do with files DALI cannot decode (corrupt, truncated, not images, unreadable,
    smaller than the crop box), found by a scan at start-up: error (stop before training, with
    the list) or skip (train on the rest)."""

    builtin_faces: int = 10_000
    """How many built-in faces to render (once, then cached) when data_dir is unset."""

    cache_dir: str | None = None
    """Where the built-in faces are cached. Unset: $DISTGAN_CACHE, else ~/.cache/distgan."""

    def flips_for(self, channels: int) -> bool:
        """Whether a model of `channels` channels trains on flipped images: `flip` if set, else
        colour images only."""
        return self.flip if self.flip is not None else channels == 3

    def __post_init__(self) -> None:
        _require_positive(self, "num_threads", "builtin_faces")
        _require_choices(self)
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


POSITIVE_TRAIN_FIELDS = (
    *("batch_size", "max_steps", "epochs", "lr_g", "lr_d", "gp_weight", "log_every"),
    *("sample_every", "ckpt_every", "keep_checkpoints", "num_samples", "dist_timeout"),
    *("eval_every", "eval_num", "eval_real_num", "nonfinite_limit", "ada_kimg"),
)


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation, the schedule of outputs, and where they go."""

    out_dir: str = "runs/dcgan"
    """Output folder: samples, metrics, checkpoints, the final generator."""

    batch_size: int = 64
    """Images per process per step; the global batch is this times the number of processes."""

    max_steps: int | None = None
    """Stop after this many optimizer steps. Unset: train for `epochs` epochs."""

    epochs: int = 5
    """Passes over the data when max_steps is unset."""

    lr_g: float = 2e-4
    """Adam learning rate of G."""

    lr_d: float = 2e-4
    """Adam learning rate of D."""

    beta1: float = 0.5
    """Adam beta1 (DCGAN: 0.5)."""

    beta2: float = 0.999
    """Adam beta2."""

    lr_schedule: LrSchedule = "constant"
    """The learning rates over the run: constant, or falling from lr_g and lr_d at step 0 to 0 at
    the run's last step (max_steps, or epochs x steps per epoch) along a line (linear) or a
    half cosine (cosine). A resumed run with a new budget follows the new one from where it is.
    Can change on resume."""

    loss: Loss = "bce"
    """GAN loss: bce (non-saturating, with label smoothing), hinge, or wgan-gp."""

    real_label: float = 0.9
    """Target for real images in the bce loss; below 1 is one-sided label smoothing."""

    gp_weight: float = 10.0
    """Weight of the gradient penalty with loss=wgan-gp."""

    augment: AugmentMode = "diffaugment"
    """Augmentation of the images D sees, real and generated alike (differentiable, so G learns
    through it): none; diffaugment (DiffAugment: colour, translation, cutout on every image); or
    ada (adaptive: flips, rotations, scaling, translation and colour changes, each applied with a
    probability p that rises while D overfits and falls while it does not; p is logged as aug_p).
    The default, diffaugment, gave the lowest distance on 500, 2,000 and 10,000 faces in
    `python -m bench.quality`'s 1,200-step budget (bench/README.md, with longer runs). Can change
    on resume."""

    diffaugment_ops: list[str] = dataclasses.field(default_factory=lambda: list(DIFF_OPS))
    """DiffAugment's ops with augment=diffaugment: one or more of colour, translation, cutout
    (default: all three, the paper's policy for small data; bench/README.md compares them with
    translation and cutout alone). Can change on resume."""

    ada_target: float = 0.6
    """ADA's target for E[sign(D(real))], the mean sign of D's logits on the real images (-1 to
    1): p rises while the mean is above it (D overfits) and falls while it is below."""

    ada_kimg: float = 100.0
    """ADA's speed: thousands of images over which p can move by 1 (StyleGAN2-ADA: 500; 100 lets
    p move within runs of a few thousand steps)."""

    mixed_precision: MixedPrecision = "auto"
    """no, fp16 (CUDA only), bf16, or auto: the launcher's choice if it made one (accelerate
    launch --mixed_precision, or its config file; its default `no` is not a choice), else bf16
    where the hardware computes it natively (recent CPUs and GPUs), else no."""

    channels_last: bool = True
    """Keep G, D and the image batches in channels-last (NHWC) memory layout: faster convolutions
    on CPUs (oneDNN) and on tensor-core GPUs (see bench/README.md)."""

    compile: bool = False
    """torch.compile G and D. Off by default: on this project's CPU benchmark it was no faster
    than eager channels-last bf16 (bench/README.md). The first step's compile time is printed."""

    deterministic: bool = False
    """Deterministic GPU kernels (cuDNN, cuBLAS) and no cuDNN autotuning, so that on a GPU a
    resumed run matches an uninterrupted one, and cached data matches streamed, bit for bit (on
    the CPU they always do). Off: cuDNN picks the fastest kernels, whose backward is not
    deterministic."""

    seed: int = 0
    """Seed of everything: data order, flips, z (offset per process), init."""

    ema_decay: float = 0.999
    """Decay of the exponential moving average of G's weights, used for samples and export."""

    log_every: int = 10
    """Steps between lines of metrics.jsonl. The processes agree (one small collective, the
    loop's only sync with the device) at least every 10 steps and at every log step."""

    sample_every: int = 100
    """Steps between sample grids in samples/."""

    ckpt_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""

    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""

    num_samples: int = 64
    """Images in each sample grid (fixed z, so grids are comparable across steps)."""

    report_to: ReportTo = "auto"
    """Experiment trackers that get every metrics line, the sample grids, FID/KID and the config
    (main process only): tensorboard (files in OUT/tensorboard/), wandb (Weights & Biases; files
    in OUT/wandb/, all of them with WANDB_MODE=offline), all (both), none, or auto: TensorBoard
    when it is installed, else none."""

    eval_every: int | None = None
    """Steps between FID/KID evaluations of the EMA generator (unset: none during training)."""

    eval_num: int = 10_000
    """Generated images per evaluation (50,000 for numbers comparable with papers)."""

    eval_real_num: int | None = None
    """Reference images for the real statistics, chosen by a fixed seed (unset: all of them).
    Computed once per dataset, resolution, crop and extractor, then cached."""

    eval_features: EvalFeatures = "inception"
    """Feature extractor: inception (the standard FID Inception-v3, via torch-fidelity) or pixels
    (8x8 pixel means: a smoke test, not comparable to FID)."""

    inception_weights: str | None = None
    """The FID Inception weights file, for machines without internet (checked against its
    published checksum). Unset: torch-fidelity's cache, downloaded there if possible."""

    nonfinite_limit: int = 20
    """Consecutive steps with non-finite losses or gradients (each one skipped) after which the
    run rolls back or stops (on_nonfinite)."""

    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    """rollback: resume from the last good checkpoint with learning rates x rollback_lr_factor;
    stop: end the run with a message naming the last good checkpoint."""

    rollback_lr_factor: float = 0.5
    """Factor applied to both learning rates at each rollback."""

    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (SyncBatchNorm, CUDA only). Off: each
    process normalises with its own batch statistics (DDP with broadcast_buffers=False)."""

    dist_timeout: int = 600
    """Seconds a collective waits for the other processes before the job fails, so a dead or
    stuck process ends the job instead of hanging it."""

    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in out_dir, if any; none: start fresh
    (refused if out_dir already holds checkpoints); or the path of a checkpoint folder."""

    init_from: str | None = None
    """Start a new run from trained weights, to fine-tune them (e.g. on a new data_dir): a run
    folder or one of its checkpoints (G, D and EMA G), a Hub model folder (RUN/hub) or a Hub repo
    id user/name (G and EMA G; D fresh). The model comes from them (flags that contradict it are
    refused); optimizers and the step start afresh. A run already in out_dir resumes instead."""

    def __post_init__(self) -> None:
        _require_positive(self, *POSITIVE_TRAIN_FIELDS)
        _require_choices(self)
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ValueError(
                f"rollback_lr_factor={self.rollback_lr_factor} is not allowed: use 0 < x <= 1"
            )
        if self.compile and self.loss == "wgan-gp":
            raise ValueError(
                "compile=True does not work with loss='wgan-gp': its gradient penalty needs a "
                "double backward, which torch.compile does not support; drop --compile or use "
                "another loss"
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
        if not self.resume:
            raise ValueError("resume='' is not allowed: use auto, none, or a checkpoint folder")
        if self.init_from == "":
            raise ValueError("init_from='' is not allowed: give a run, folder or Hub repo id")


# Model fields that no flag or file sets: training resolves them from the data (channels, from
# the data's --channels) and stores them with the model, in checkpoints and generator files.
RESOLVED_MODEL_FIELDS = frozenset({"channels"})


def settable_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config section that a flag or the config file sets."""
    resolved = RESOLVED_MODEL_FIELDS if cls is ModelConfig else frozenset()
    return [f for f in dataclasses.fields(cls) if f.name not in resolved]


def _settable_values(section) -> dict:
    names = {f.name for f in settable_fields(type(section))}
    return {k: v for k, v in dataclasses.asdict(section).items() if k in names}


@dataclass(kw_only=True)
class Config:
    """Everything a training run needs; TOML sections [model], [data], [train]."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    given: frozenset[str] = field(default=frozenset(), compare=False)
    """The fields the user set (a flag, or the --config file); the rest are defaults."""

    def values(self) -> dict:
        """Every field of every section by name (field names are unique across sections)."""
        return {k: v for name in SECTIONS for k, v in _settable_values(getattr(self, name)).items()}

    def to_dict(self) -> dict:
        """Sections of plain values, unset (None) fields left out since TOML has no null."""
        return {
            name: {k: v for k, v in _settable_values(getattr(self, name)).items() if v is not None}
            for name in SECTIONS
        }

    def save_toml(self, path: str | Path) -> None:
        write_text_atomically(path, tomli_w.dumps(self.to_dict()))


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint) -> tuple[type, bool]:
    """(the type a flag parses, whether None is allowed) for hints like `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _add_flags(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    group = parser.add_argument_group(f"[{section}]", summary)
    for f in settable_fields(cls):
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = " ".join(map(str, f.default_factory()))
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        choices = _choices(hints[f.name])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:  # checked by the dataclass, so a bad value is the same one-line error
            kwargs.update(type=str, metavar="{" + ",".join(choices) + "}")
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            kwargs.update(type=item, nargs="+", metavar="N" if item is int else "NAME")
        else:
            kwargs.update(type=base, metavar=base.__name__.upper())
        group.add_argument(_flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a DCGAN on a folder of face images (or the built-in faces). Run under "
        "`accelerate launch` for several processes; plain `python` runs one.",
    )
    about = "TOML file with [model] [data] [train] sections; flags given here override it"
    parser.add_argument("--config", metavar="FILE.toml", help=about)
    for section, cls in SECTIONS.items():
        _add_flags(parser, section, cls)
    return parser


def _check_keys(section: str, values: dict, cls: type) -> None:
    known = [f.name for f in settable_fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise UserError(f"unknown key {key!r} in [{section}]{hint}")


def load_toml(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: check the --config path") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    for section, values in raw.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise UserError(
                f"unknown section [{section}] in {path}: use [model], [data], [train]{hint}"
            )
        if not isinstance(values, dict):
            raise UserError(f"{section} in {path} must be a [{section}] table")
        _check_keys(section, values, SECTIONS[section])
    return raw


def make_config(sections: dict[str, dict] | None = None, **overrides) -> Config:
    """A Config from section dicts plus flat field overrides (any section's field by name)."""
    merged = {name: dict((sections or {}).get(name, {})) for name in SECTIONS}
    owner = {f.name: name for name, cls in SECTIONS.items() for f in settable_fields(cls)}
    for key, value in overrides.items():
        if key not in owner:
            close = difflib.get_close_matches(key, list(owner), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        merged[owner[key]][key] = value
    for name, cls in SECTIONS.items():
        _check_types(name, merged[name], cls)
    given = frozenset(key for values in merged.values() for key in values)
    try:
        sections = {name: cls(**merged[name]) for name, cls in SECTIONS.items()}
    except ValueError as err:  # a value rejected by a section's __post_init__
        raise UserError(str(err)) from None
    return Config(**sections, given=given)


# What a resumed run cannot change: what it has learnt, from which data, and how. Everything
# else (steps, learning rates, cadences, speed settings) can. The model's fields include
# "channels", which is the data's --channels flag here (the model's own is resolved from it).
FIXED_ON_RESUME = {f.name for f in dataclasses.fields(ModelConfig)} | {
    "data_dir",
    "crop_box",
    "flip",
    "builtin_faces",
    "batch_size",
    "seed",
    "loss",
    "real_label",
    "gp_weight",
    "beta1",
    "beta2",
    "ema_decay",
    "sync_bn",
    "mixed_precision",
    "init_from",
}
NOT_COMPARED_ON_RESUME = frozenset({"out_dir", "resume"})


# Fields added after runs were first saved whose default is not what a config.toml without them
# trained with: a run resumed from such a file goes on as it was trained.
BEFORE_THE_FIELD = {"train": {"augment": "none"}}


def saved_run_config(path: str | Path) -> Config:
    """The config a run saved in its config.toml, fields it predates filled in as it ran."""
    sections = load_toml(path)
    for section, values in BEFORE_THE_FIELD.items():
        sections[section] = {**values, **sections.get(section, {})}
    return make_config(sections)


def resume_config(saved: Config, requested: Config) -> tuple[Config, dict[str, tuple]]:
    """The config a resumed run goes on with: the saved run's, with what the user changed
    (`requested.given`) applied. A change that cannot apply to a trained run (model, data,
    losses, batch, seed) is a one-line error. Returns the config and {field: (old, new)}."""
    old, new = saved.values(), requested.values()
    asked = requested.given - NOT_COMPARED_ON_RESUME
    changes = {key: (old[key], new[key]) for key in sorted(asked) if old[key] != new[key]}
    refused = [key for key in changes if key in FIXED_ON_RESUME]
    if refused:
        listed = ", ".join(f"{key} {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise UserError(
            f"{requested.train.out_dir} holds a run trained with other settings ({listed}), "
            "which cannot change when it resumes: drop those flags to resume it, or train anew "
            "in a new --out-dir (--resume none refuses to overwrite this one)"
        )
    kept = changes.keys() | NOT_COMPARED_ON_RESUME
    merged = {key: new[key] if key in kept else value for key, value in old.items()}
    unset = {key for key, value in merged.items() if value is None}  # the defaults
    config = make_config(**{key: merged[key] for key in merged.keys() - unset})
    return dataclasses.replace(config, given=requested.given), changes


def _check_types(section: str, values: dict, cls: type) -> None:
    """TOML values must have the field's type: a clear error beats a crash deep in training."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        base, optional = _base_type(hints[key])
        if value is None and optional:
            continue
        expected = list if typing.get_origin(base) is list else base
        choices = _choices(hints[key])
        if choices:
            expected = str
            if type(value) is int and str(value) in choices:  # TOML's channels = 1 means "1"
                values[key] = value = str(value)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
            ok = True
        if not ok:
            raise UserError(
                f"{key}={value!r} in [{section}] is not allowed: expected {expected.__name__}"
            )


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config for a command line: defaults, then --config FILE, then the flags given."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    sections = load_toml(config_file) if config_file else {}
    return make_config(sections, **args)
