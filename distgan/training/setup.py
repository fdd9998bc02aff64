"""The pieces a run is set up from: the processes and the Accelerator, the resume (config, then
weights), the decoded-image cache, and the progress bar."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import (
    Accelerator,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    PartialState,
)
from tqdm.auto import tqdm

from distgan.config.config import Config, resume_config, saved_run_config
from distgan.config.model import ModelConfig
from distgan.config.sections import FailuresConfig
from distgan.data import order
from distgan.data.loader import ImageLoader
from distgan.errors import UserError
from distgan.outputs.checkpoint import TrainerState, load_checkpoint
from distgan.outputs.report import append_jsonl
from distgan.outputs.tracking import make_trackers
from distgan.training.gan import GAN

PROGRESS_TO_FILE_SECONDS = 60
CHANGES_FILE = "changes.jsonl"  # settings changed on resume, with the step they took effect


def start_processes(failures: FailuresConfig) -> PartialState:
    """Accelerate's processes and their group, before the Accelerator (whose precision may come
    from the checkpoint the main process picks), which joins them."""
    timeout = timedelta(seconds=failures.dist_timeout)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def make_accelerator(cfg: Config, mixed_precision: str) -> Accelerator:
    """Accelerate's processes, DDP and autocast (in `mixed_precision`) as the config says."""
    # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which Accelerate's kwargs
    # handler cannot pass yet; its own text says to keep broadcast_buffers=False for local buffers.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    # D runs three times per step (real, fake, fake for G) with BatchNorm: broadcasting buffers
    # on each forward would break autograd, so every process keeps its own BN statistics.
    handlers = [
        DistributedDataParallelKwargs(broadcast_buffers=False),
        InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.failures.dist_timeout)),
    ]
    outputs = cfg.outputs
    trackers = make_trackers(outputs.report_to, Path(outputs.out_dir))  # main process only
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),  # without it, CPU processes would not form a group
        kwargs_handlers=handlers,
        log_with=trackers or None,  # an empty list makes Accelerate warn of missing trackers
    )


def config_for_resume(cfg: Config, checkpoint: Path, model: ModelConfig):
    """The config a resumed run goes on with, what the user changed in it, and a note to print:
    the config.toml of the checkpoint's run with the changes that can apply; the model always
    the checkpoint's (`model`)."""
    saved_toml = checkpoint.parent.parent / "config.toml"
    changes, note = {}, ""
    if saved_toml.is_file():
        cfg, changes = resume_config(saved_run_config(saved_toml), cfg)
    if not saved_toml.is_file() and model != cfg.model:
        note = f"note: resuming {checkpoint} (its run has no config.toml): the model comes from it"
    return replace(cfg, model=model), changes, note


def resume(accelerator, checkpoint: Path, saved: TrainerState, gan: GAN, tc, changes):
    """Load the checkpoint (whose state is `saved`) into G, D, the optimizers, the EMA and the
    RNG, once it is sure to go on as it was trained: the same precision and global batch (the
    data position counts steps). Returns the state to go on with."""
    precision = accelerator.mixed_precision
    global_batch = order.global_batch(accelerator.num_processes, tc.batch_size)
    if saved.precision not in (None, precision):
        raise UserError(
            f"{checkpoint} was trained in {saved.precision}, and this run would use {precision}: "
            f"pass --mixed-precision {saved.precision} to resume it"
        )
    if saved.global_batch not in (None, global_batch):
        raise UserError(
            f"{checkpoint} was trained with a global batch of {saved.global_batch} images, and "
            f"this run has {global_batch} ({tc.batch_size} x {accelerator.num_processes} "
            "processes): resume it with as many processes as before"
        )
    state = load_checkpoint(accelerator, checkpoint, gan.ema)  # RNG states included
    gan.set_learning_rates(tc, state.lr_scale)
    gan.augment.restore(state.aug_p)
    if changes.keys() & {"eval_features", "eval_real_num"}:  # FIDs now measured another way
        state.best_fid = state.best_step = None
    state.precision, state.global_batch = precision, global_batch
    return state


def announce_resume(out_dir: Path, step: int, changes: dict[str, tuple], note: str) -> None:
    """Say what a resume changed (main process): each change on the terminal and, with its step,
    in changes.jsonl; config.toml holds the settings now."""
    lines = [note] if note else []
    for key, (old, new) in changes.items():
        lines.append(f"resuming with {key} {old!r} -> {new!r} (recorded in config.toml)")
    for line in lines:
        print(line, flush=True)
    if changes:
        changed = {key: list(values) for key, values in changes.items()}
        append_jsonl(out_dir / CHANGES_FILE, {"step": step, "changes": changed})


def build_cache(loader: ImageLoader, log) -> None:
    """Decode the data into memory now, before the clock of the first steps starts, and say where
    it went (or why the run streams from the files instead)."""
    start = time.perf_counter()
    cache = loader.build_cache()
    size = f"{loader.cache_bytes / 2**20:.0f} MiB"
    if cache is None:
        log(
            f"streaming images from files: decoded they would take {size}, more than this "
            "process's share of a quarter of the free memory"
        )
        return
    seconds = time.perf_counter() - start
    where = f"{size} in {cache.device} memory, decoded in {seconds:.1f} s"
    log(f"decoded-image cache: {len(loader.files)} images, {where}")


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A live bar on a terminal; when stderr is a file (SLURM's log, a redirect), an update at
    most every PROGRESS_TO_FILE_SECONDS, so a long job's log stays small."""
    every = 0.1 if sys.stderr.isatty() else PROGRESS_TO_FILE_SECONDS
    options = {"unit": "step", "mininterval": every, "disable": not enabled}
    return tqdm(total=total, initial=initial, **options)
