"""Checkpoints (the whole training state, for resuming) and the standalone generator file
(written here; read by generator_file.py, and loaded into a Generator here).

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding what `accelerator.save_state` writes
(G, D, both optimizers, the fp16 scaler, every process's RNG), the EMA generator as safetensors,
and `trainer_state.json` (step, images seen, the model config), then `checksums.json` (the size
and SHA-256 of every file, verified before a resume: outputs/checksums.py). It is written under a
staging name and renamed into place when complete, so a folder with the final name is always
whole; a crash mid-write leaves only a staging folder, which is never resumed from.

Nothing here unpickles: weights are safetensors, state is JSON, and Accelerate loads its files
with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distgan import __version__
from distgan.config.model import ModelConfig
from distgan.errors import UserError, first_line
from distgan.models.dcgan import Generator
from distgan.models.ema import EMA
from distgan.outputs.checksums import Damaged, write_checksums
from distgan.outputs.generator_file import (
    GENERATOR_FORMAT,
    GENERATOR_META,
    GENERATOR_WEIGHTS,
    read_generator_files,
)
from distgan.runtime.files import write_atomically, write_json_atomically

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
# Accelerate's names for the prepared models of a checkpoint, in the order train.py prepares them.
CHECKPOINT_G, CHECKPOINT_D = "model.safetensors", "model_1.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
DAMAGED_FIX = (
    "resume from another checkpoint (--resume PATH, or --resume auto for the newest intact one) "
    "or start a new run (--resume none with a new --out-dir)"
)


@dataclass(kw_only=True)
class TrainerState:
    """Where a run is, beyond its weights: written into every checkpoint's trainer_state.json
    (by `to_json`) and read back from it (by `read_trainer_state`), nowhere else."""

    step: int
    """Optimizer steps done."""

    model: ModelConfig
    """The architecture, so that a resume rebuilds exactly the same shapes."""

    images_seen: int = 0
    """Real images fed to D so far, over all processes."""

    wall_time: float = 0.0
    """Seconds of training so far, over every resumed part of the run."""

    global_batch: int | None = None
    """Images per step over all processes (None in checkpoints that predate it)."""

    precision: str | None = None
    """The mixed precision it trains in, as resolved (None in checkpoints that predate it)."""

    lr_scale: float = 1.0
    """Factor on both learning rates, lowered by each rollback after non-finite steps."""

    aug_p: float = 0.0
    """ADA's augmentation probability p (0 in checkpoints that predate it; kept as it was while
    augment is not ada)."""

    best_fid: float | None = None
    """The best FID measured during training, if any."""

    best_step: int | None = None
    """The step of that FID."""

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_json(cls, values: dict) -> TrainerState:
        """The state `values` (parsed JSON) describe; ValueError saying what is wrong with them,
        as a phrase that follows the file's name ("lacks the field 'model'")."""
        if not isinstance(values, dict):
            raise ValueError(f"holds a JSON {type(values).__name__}, not an object")
        fields = dataclasses.fields(cls)
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(
                f"lacks the field{'s' * (len(missing) > 1)} {' and '.join(map(repr, missing))}"
            )
        step, model = values["step"], values["model"]
        if type(step) is not int or step < 0:
            raise ValueError(f"has step {step!r}, not a step number")
        try:
            config = ModelConfig.from_dict(model)
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"has a model that is no model config ({err})") from None
        known = {f.name for f in fields}
        return cls(**{**{k: v for k, v in values.items() if k in known}, "model": config})


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def load_checkpoint_ema(path: str | Path, model: ModelConfig) -> Generator:
    """The EMA generator of a checkpoint folder (eval mode), read without Accelerate."""
    ema_file = Path(path) / EMA_FILE
    generator = Generator(model)
    try:
        generator.load_state_dict(load_file(str(ema_file)))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise UserError(f"{ema_file} could not be loaded ({first_line(err)})") from None
    return generator.eval()


def parse_trainer_state(path: str | Path) -> TrainerState:
    """The state of a checkpoint folder: FileNotFoundError without a trainer_state.json, Damaged
    naming what is wrong with it ("trainer_state.json lacks the field 'model'")."""
    try:
        text = (Path(path) / STATE_FILE).read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise Damaged(f"{STATE_FILE} cannot be read ({first_line(err)})") from None
    if not text.strip():
        raise Damaged(f"{STATE_FILE} is empty")
    try:
        return TrainerState.from_json(json.loads(text))
    except json.JSONDecodeError as err:
        raise Damaged(f"{STATE_FILE} is not valid JSON ({err})") from None
    except ValueError as err:
        raise Damaged(f"{STATE_FILE} {err}") from None


def read_trainer_state(path: str | Path) -> TrainerState:
    """The state of a checkpoint folder, checked to be one of ours."""
    try:
        return parse_trainer_state(path)
    except FileNotFoundError:
        raise UserError(
            f"{path} is not a complete distgan checkpoint (no {STATE_FILE}): pass a "
            "checkpoints/step-* folder, or --resume auto"
        ) from None
    except Damaged as err:
        raise UserError(f"checkpoint {path} is damaged ({err}): {DAMAGED_FIX}") from None


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that no crash can leave it looking complete: rename it out
    of the step-* namespace first (atomic), then delete."""
    doomed = path.with_name(f".deleting-{path.name}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_unfinished(root: str | Path) -> None:
    """Remove what a crash mid-write or mid-delete left behind (main process, at start-up)."""
    root = Path(root)
    if root.is_dir():
        for leftover in [*root.glob(".staging-*"), *root.glob(".deleting-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    ema: EMA,
    state: TrainerState,
    keep: int,
    ensure_held: Callable[[], None] | None = None,
) -> Path:
    """Write the checkpoint of `state.step` (call on every process), then keep the newest `keep`.

    Nothing the user had is touched until the new checkpoint is complete; if writing fails (a
    full disk), the partial one is removed and the error says which checkpoint is intact.
    `ensure_held` (RunLock.ensure_held) runs on the main process just before the checkpoint goes
    into place: it stops a trainer whose run folder's lock was taken over meanwhile.
    """
    root = Path(root)
    final = checkpoint_dir(root, state.step)
    staging = root / f".staging-{final.name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)  # each process: its RNG
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file(ema.state_dict(), str(staging / EMA_FILE))
            # The completion marker, then the checksums of every file, for a resume to verify.
            write_json_atomically(staging / STATE_FILE, state.to_json(), indent=2)
            write_checksums(staging)
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        kept = list_checkpoints(root)
        intact = f"the previous checkpoint {kept[-1]} is intact" if kept else "no checkpoint yet"
        reason = first_line(err, 160)
        raise UserError(
            f"could not write checkpoint {final.name} in {root} ({reason}); {intact}: free some "
            "space (or move --out-dir) and run the same command to resume"
        ) from None
    if accelerator.is_main_process:
        if ensure_held is not None:
            ensure_held()
        if final.exists():  # the same step saved before (e.g. a resumed run's end): replace it
            _remove(final)
        staging.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path, ema: EMA) -> TrainerState:
    """Restore G, D, optimizers, scaler, RNG and EMA from a checkpoint folder; return its state."""
    path = Path(path)
    state = read_trainer_state(path)
    try:
        # Accelerate ignores an unloadable RNG file (the resume would silently differ): check it.
        accelerate_load(path / f"random_states_{accelerator.process_index}.pkl", weights_only=True)
        accelerator.load_state(str(path))
        ema.load_state_dict(load_file(str(path / EMA_FILE)))  # copied onto the EMA's device
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError) as err:
        # weights_only loading refuses pickled code with UnpicklingError: never executed.
        reason = first_line(err)
        raise UserError(
            f"checkpoint {path} could not be loaded ({reason}): resume from another checkpoint "
            "(--resume PATH) or start a new run (--resume none with a new --out-dir)"
        ) from None
    return state


def save_generator(
    out_dir: str | Path, generator: Generator, *, step: int, images_seen: int
) -> Path:
    """Write `generator.safetensors` + `generator.json`: all that export and inference need."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in generator.state_dict().items()}
    tagged = {"metadata": {"format": GENERATOR_FORMAT}}
    path = out_dir / GENERATOR_WEIGHTS
    write_atomically(path, lambda tmp: save_file(weights, str(tmp), **tagged))
    config = generator.config
    write_json_atomically(
        out_dir / GENERATOR_META,
        {
            "format": GENERATOR_FORMAT,
            "distgan_version": __version__,
            "model": config.to_dict(),
            "z_dim": config.z_dim,
            "z_distribution": config.z_distribution,  # older files: "normal(0, 1)"
            "resolution": config.resolution,
            "channels": config.channels,
            "output": f"float32 NCHW {'gray' if config.channels == 1 else 'RGB'} in [-1, 1]",
            "step": step,
            "images_seen": images_seen,
        },
    )
    return out_dir / GENERATOR_WEIGHTS


def load_generator(path: str | Path, meta_name: str = GENERATOR_META) -> tuple[Generator, dict]:
    """A Generator in eval mode from `generator.safetensors` (or the run folder holding it), and
    the contents of its `generator.json` (`meta_name`: the same file under another name, as
    config.json in a Hub model folder)."""
    files = read_generator_files(path, meta_name)
    generator = Generator(files.config)
    files.load_into(generator)
    return generator.eval().requires_grad_(False), files.meta
