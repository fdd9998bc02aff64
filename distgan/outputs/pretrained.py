"""The weights a new run starts from (`--init-from`): another run, one of its checkpoints, a
generator folder, a Hub model folder or a Hub repo id.

Every process reads the same source itself (a Hub download is cached and file-locked, so the
processes of a node share one), before any work. The source decides the model: flags that would
change what its weights are refused with one line. Optimizers, step and data position start
afresh; a run that already has checkpoints in --out-dir resumes from them instead (train.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distgan.config.config import Config
from distgan.config.model import ModelConfig
from distgan.errors import UserError, first_line
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import (
    CHECKPOINT_D,
    CHECKPOINT_G,
    EMA_FILE,
    STATE_FILE,
    list_checkpoints,
    load_generator,
    read_trainer_state,
)
from distgan.outputs.generator_file import GENERATOR_META

# The model fields that shape only D: free to set when the source has no D (D starts fresh).
D_ONLY_FIELDS = frozenset(
    {"d_channels", "d_spectral_norm", "d_dropout", "d_classifier", "leaky_slope", "init"}
)


@dataclass(kw_only=True)
class StartingWeights:
    """What --init-from gives a new run: the source's model and weights. A checkpoint has G, D and
    the EMA G; a generator (Hub folder, generator.safetensors) only its EMA G, which then starts
    both G and the EMA, with D fresh."""

    source: str
    model: ModelConfig
    generator: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None

    def load_into(self, generator, discriminator, ema_generator) -> None:
        """Copy the weights into freshly built models (same architecture, checked by shape)."""
        targets = [(generator, self.generator), (ema_generator, self.ema or self.generator)]
        if self.discriminator is not None:
            targets.append((discriminator, self.discriminator))
        for module, weights in targets:
            try:
                module.load_state_dict(weights)
            except RuntimeError as err:
                raise UserError(
                    f"--init-from {self.source}: its weights do not fit its own model config "
                    f"({first_line(err, 160)})"
                ) from None

    def describe(self) -> str:
        what = "G, D and EMA G" if self.discriminator is not None else "G and EMA G (D fresh)"
        return f"starting from {self.source}: {what}; fresh optimizers, step 0"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"--init-from: {path} could not be loaded ({first_line(err)})") from None


def read_starting_weights(source: str) -> StartingWeights:
    """The weights of `source`: a run folder (its newest checkpoint), a checkpoint folder, a
    folder with generator.safetensors + generator.json (a run's best/), or a Hub model folder
    or repo id."""
    path = Path(source).expanduser()
    checkpoints = list_checkpoints(path / "checkpoints") if path.is_dir() else []
    if checkpoints:
        path = checkpoints[-1]
    if (path / STATE_FILE).is_file():
        model = read_trainer_state(path).model
        weights = {
            name: _tensors(path / file)
            for name, file in (("g", CHECKPOINT_G), ("d", CHECKPOINT_D), ("ema", EMA_FILE))
        }
        return StartingWeights(
            source=source,
            model=model,
            generator=weights["g"],
            discriminator=weights["d"],
            ema=weights["ema"],
        )
    try:
        if (path / GENERATOR_META).is_file():
            generator, _ = load_generator(path)
        else:
            generator = Generator.from_pretrained(source)
    except UserError as err:
        raise UserError(
            f"--init-from: {err} (it takes a run, a checkpoints/step-* folder, a generator "
            "folder or a Hub model folder or repo id)"
        ) from None
    return StartingWeights(source=source, model=generator.config, generator=generator.state_dict())


def config_from_source(cfg: Config, start: StartingWeights) -> Config:
    """`cfg` with the source's model. The model fields the user set (a flag or --config file)
    must agree with it, except D's own when the source has no D; data's `channels`, unless
    auto, must be the model's."""
    fixed = [f.name for f in dataclasses.fields(ModelConfig)]
    if start.discriminator is None:
        fixed = [name for name in fixed if name not in D_ONLY_FIELDS]
    source, asked = dataclasses.asdict(start.model), cfg.values()
    conflicts = {
        name: (source[name], asked[name])
        for name in fixed
        if name in cfg.given and name != "channels" and asked[name] != source[name]
    }
    channels = cfg.data.channels
    if "channels" in cfg.given and channels != "auto" and int(channels) != start.model.channels:
        conflicts["channels"] = (start.model.channels, int(channels))
    if conflicts:
        listed = ", ".join(
            f"{name} {new!r} (it has {old!r})" for name, (old, new) in conflicts.items()
        )
        raise UserError(
            f"--init-from {start.source} fixes the model, and the flags ask for another: "
            f"{listed}; drop those flags"
        )
    chosen = {name: asked[name] for name in D_ONLY_FIELDS - set(fixed) if name in cfg.given}
    return dataclasses.replace(cfg, model=dataclasses.replace(start.model, **chosen))
