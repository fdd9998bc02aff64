"""The maintenance below the loop's gate: each task (metrics log, evaluation, samples,
checkpoints) owns its interval, and the gate is derived from the list of tasks."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from distgan.config.model import ModelConfig
from distgan.models.conditioning import grid_rows
from distgan.models.dcgan import sample_latents
from distgan.outputs.checkpoint import TrainerState, save_checkpoint, save_generator
from distgan.outputs.report import append_jsonl, plot_losses, save_grid
from distgan.outputs.tracking import Tracking
from distgan.training.stats import Agreement

if TYPE_CHECKING:
    from distgan.training.gan import GAN

AGREE_EVERY = 10  # steps between the collectives that agree on stopping (at most)


class RunLog:
    """Where the run reports, from the main process only: lines on the terminal (above the
    progress bar) and metrics.jsonl, whose numbers also go to the trackers."""

    def __init__(self, is_main: bool, progress: tqdm, out_dir: Path, tracking: Tracking):
        self.is_main, self.progress, self.tracking = is_main, progress, tracking
        self.metrics_path = out_dir / "metrics.jsonl"

    def say(self, line: str) -> None:
        if self.is_main:
            self.progress.write(line)

    def log_metrics(self, values: dict, section: str = "train") -> None:
        """A line of metrics.jsonl; its numbers go to the trackers, named `section`/key."""
        if self.is_main:
            append_jsonl(self.metrics_path, values)
            self.tracking.log(values, section)


class Throughput:
    """Training images/s since the last log line, with the time of maintenance (samples,
    checkpoints, evaluation) and of the first, compiling step kept out; and the run's wall time
    over every resumed part."""

    def __init__(self, global_batch: int, state: TrainerState, compiling: bool, log):
        self.global_batch, self.compiling, self.log = global_batch, compiling, log
        self.started, self.wall_before = time.perf_counter(), state.wall_time
        self.restart(state.step)

    def restart(self, step: int) -> None:
        self.window_start, self.window_step, self.paused_seconds = time.perf_counter(), step, 0.0

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        if self.compiling:  # the first step compiles: time it, keep it out of images/s
            loss.item()  # waits for the step to finish
            self.compiling = False
            self.log(f"torch.compile: first step (compiling) took {self._window_seconds():.1f} s")
            self.restart(step)

    def _window_seconds(self) -> float:
        return time.perf_counter() - self.window_start

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.paused_seconds += time.perf_counter() - start

    def images_per_sec(self, step: int) -> float:
        """The rate over the window that ends now, and a new window."""
        seconds = self._window_seconds() - self.paused_seconds
        rate = (step - self.window_step) * self.global_batch / seconds
        self.restart(step)
        return rate

    def wall_time(self) -> float:
        return round(self.wall_before + time.perf_counter() - self.started, 2)


class Task:
    """Maintenance that runs every `every` steps (0: never) and at the run's last step; with
    `on_stop`, also at the step where the run stops early."""

    every: int = 0
    on_stop: bool = False

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        if not self.every:
            return False
        return step % self.every == 0 or last or (self.on_stop and stopping)

    def run(self, state: TrainerState, verdict: Agreement) -> None:
        raise NotImplementedError


class MetricsLog(Task):
    """A metrics.jsonl line and the progress bar every log_every steps; the speed and the
    skipped steps count afresh from each line."""

    def __init__(self, every, log: RunLog, gan: GAN, speed, watch, steps_per_epoch: int):
        self.every, self.log, self.gan = every, log, gan
        self.speed, self.watch, self.steps_per_epoch = speed, watch, steps_per_epoch

    def run(self, state: TrainerState, verdict: Agreement) -> None:
        self.watch.window_done()
        images_per_sec = self.speed.images_per_sec(state.step)
        self.log.log_metrics(
            {
                "step": state.step,
                "epoch": round(state.step / self.steps_per_epoch, 4),
                "images_seen": state.images_seen,
                "loss_d": verdict.loss_d,
                "loss_g": verdict.loss_g,
                "d_real": verdict.d_real,
                "d_fake": verdict.d_fake,
                "images_per_sec": round(images_per_sec, 2),
                "lr_g": self.gan.opt_g.param_groups[0]["lr"],
                "lr_d": self.gan.opt_d.param_groups[0]["lr"],
                "skipped_steps": verdict.skipped_steps,
                **self.gan.augment.metrics(),
                "wall_time": self.speed.wall_time(),
            }
        )
        losses = {"loss_d": f"{verdict.loss_d:.3f}", "loss_g": f"{verdict.loss_g:.3f}"}
        self.log.progress.set_postfix(**losses, img_s=f"{images_per_sec:.0f}", refresh=False)
        if verdict.skipped_steps:
            what = f"{verdict.skipped_steps} step(s) with non-finite losses or gradients"
            self.log.say(f"step {state.step}: skipped {what}")


class Evaluation(Task):
    """FID/KID of the EMA generator every eval_every steps; the best one is kept in best/. The
    feature extractor and the real statistics are made once, by `prepare`."""

    def __init__(self, every: int, accelerator: Accelerator, log: RunLog, gan: GAN, cfg, out_dir):
        self.every, self.accelerator, self.log, self.gan = every, accelerator, log, gan
        self.cfg, self.out_dir = cfg, out_dir
        self.extractor = self.real_stats = None

    def prepare(self, files: list[str], device_id: int | None, label_table=None) -> None:
        """The feature extractor and the real statistics (cached), before the loop; G is scored
        on labels drawn from `label_table` (the data's labels), when conditional."""
        self.label_table = label_table
        if not self.every:
            return
        from distgan.metrics.features import make_extractor  # here: only runs that evaluate
        from distgan.metrics.stats import real_files, reference_stats
        from distgan.runtime.paths import default_cache_dir

        ec, dc, accelerator = self.cfg.eval, self.cfg.data, self.accelerator
        self.extractor = make_extractor(ec.eval_features, ec.inception_weights, accelerator.device)
        self.real_stats = reference_stats(
            accelerator,
            self.extractor,
            real_files(files, ec.eval_real_num),
            cache_dir=dc.cache_dir or default_cache_dir(),
            log=accelerator.print,
            resolution=self.cfg.model.resolution,
            crop_box=dc.crop_box,
            batch_size=self.cfg.train.batch_size,
            num_threads=dc.num_threads,
            device_id=device_id,
            channels=self.cfg.model.channels,
        )

    def run(self, state: TrainerState, verdict: Agreement) -> None:
        from distgan.metrics.stats import score

        tc, ema = self.cfg.train, self.gan.ema.module
        # One generator for all processes: main's BN statistics (the weights are identical).
        for buffer in ema.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))
        options = {"batch_size": tc.batch_size, "seed": tc.seed + 1}
        result = score(
            self.accelerator,
            self.extractor,
            ema,
            self.real_stats,
            count=self.cfg.eval.eval_num,
            device=self.accelerator.device,
            label_table=self.label_table,
            **options,
        )
        if state.best_fid is None or result["fid"] < state.best_fid:
            state.best_fid, state.best_step = result["fid"], state.step
            if self.log.is_main:
                best_dir = self.out_dir / "best"
                save_generator(best_dir, ema, step=state.step, images_seen=state.images_seen)
        result["eval_seconds"] = result.pop("seconds")
        best = {"best_fid": state.best_fid, "best_step": state.best_step}
        self.log.log_metrics({"step": state.step, **result, **best}, section="eval")
        self.log.say(
            f"step {state.step}: FID {result['fid']:.3f} KID {result['kid_mean']:.5f} (best FID "
            f"{state.best_fid:.3f} at step {state.best_step}; {self.extractor.name}, "
            f"{result['n_fake']} fake vs {result['n_real']} real)"
        )


@dataclass(kw_only=True)
class SampleGrid:
    """The fixed latents (and labels) of the sample grids: a square-ish grid of num_samples
    images; when conditional, one row per class (or attribute combination) of
    max(1, num_samples // rows) images, each column one z."""

    z: torch.Tensor
    labels: torch.Tensor | None
    columns: int | None  # images per row; None: square-ish

    @classmethod
    def fixed(cls, config: ModelConfig, num_samples: int, seed: int, device) -> SampleGrid:
        seeded = torch.Generator().manual_seed(seed)
        if not config.classes:
            z = sample_latents(config, num_samples, generator=seeded)
            return cls(z=z.to(device), labels=None, columns=None)
        names, row_labels = grid_rows(config)
        columns = max(1, num_samples // len(names))
        z = sample_latents(config, columns, generator=seeded).repeat(len(names), 1)
        labels = row_labels.repeat_interleave(columns, dim=0)  # row by row
        return cls(z=z.to(device), labels=labels.to(device), columns=columns)


class Samples(Task):
    """The EMA generator on the fixed grid every sample_every steps, and the loss plot."""

    def __init__(self, every: int, log: RunLog, gan: GAN, grid: SampleGrid, out_dir: Path):
        self.every, self.log, self.gan, self.grid = every, log, gan, grid
        self.folder, self.plot = out_dir / "samples", out_dir / "losses.png"

    def run(self, state: TrainerState, verdict: Agreement) -> None:
        if not self.log.is_main:
            return
        grid = self.grid
        with torch.no_grad():
            samples = self.gan.ema.module(grid.z, grid.labels)
        path = self.folder / f"step-{state.step:08d}.png"
        pixels = save_grid(samples, path, grid.columns)
        self.log.tracking.log_image("samples", pixels, state.step)
        plot_losses(self.log.metrics_path, self.plot)


class Checkpoints(Task):
    """A checkpoint every ckpt_every steps, at the last step and where the run stops early; the
    run folder's lock is checked before each goes into place."""

    on_stop = True

    def __init__(self, every, accelerator, gan: GAN, speed: Throughput, keep, folder, lock):
        self.every, self.accelerator, self.gan, self.speed = every, accelerator, gan, speed
        self.keep, self.folder, self.lock = keep, folder, lock

    def run(self, state: TrainerState, verdict: Agreement) -> None:
        state.wall_time, state.aug_p = self.speed.wall_time(), self.gan.augment.p
        save_checkpoint(
            self.accelerator,
            self.folder,
            self.gan.ema,
            state,
            keep=self.keep,
            ensure_held=self.lock.ensure_held if self.lock is not None else None,
        )


class Gate:
    """The steps where the processes agree and the tasks may run: the same answer on every
    process, from the step number alone. Derived from the tasks' intervals, so a new task is
    never left out; and at most AGREE_EVERY steps apart, so a stop is acted on promptly."""

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks
        self.every = [AGREE_EVERY, *(task.every for task in tasks if task.every)]

    def due(self, step: int) -> bool:
        return any(step % every == 0 for every in self.every)
