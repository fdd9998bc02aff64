"""The trainer: set-up builds a run's components onto one object, then one loop reads top to
bottom. Accelerate supplies the processes, DDP and mixed precision; DALI the data; everything
written to disk is written by the main process.

The loop runs the hot path (a batch, the GAN step, counters) and then one gate: most steps go
straight on. At a gate step all processes agree, in one collective, on the logged numbers and on
every decision that changes what they do next (stop, roll back); then the maintenance tasks
whose interval has come run (training/tasks.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, set_seed

from distgan.config.config import Config
from distgan.data import order
from distgan.data.loader import ImageLoader
from distgan.data.prepare import prepare_images, resolve_channels
from distgan.errors import RunStopped, UserError, require_writable_dir
from distgan.outputs.checkpoint import (
    TrainerState,
    clean_unfinished,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_generator,
)
from distgan.outputs.pretrained import config_from_source, read_starting_weights
from distgan.outputs.report import save_grid
from distgan.outputs.runlock import RunLock
from distgan.outputs.tracking import Tracking
from distgan.runtime.agree import main_decides
from distgan.runtime.env import require_one_dali_build, require_usable_cuda
from distgan.training import setup
from distgan.training.gan import StepResult, build_gan, gan_step, lr_factor
from distgan.training.precision import choose_precision, configure_kernels, resumed_precision
from distgan.training.resume import find_resume_point
from distgan.training.stats import (
    Agreement,
    NonfiniteWatch,
    agree,
    check_ddp_consistency,
    divergence,
)
from distgan.training.stop import Faults, StopRequest, launched
from distgan.training.tasks import (
    Checkpoints,
    Evaluation,
    Gate,
    MetricsLog,
    RunLog,
    SampleGrid,
    Samples,
    Throughput,
)

MAX_ROLLBACKS = 5  # then the run stops: halving the learning rates further rarely helps


class Trainer:
    """One run: its config, processes, data, GAN, state and maintenance tasks, built by the
    set-up methods in the order they depend on each other; `train` runs the loop."""

    def __init__(self, cfg: Config, faults: Faults, processes: PartialState, lock, stop):
        self.faults, self.lock, self.stop = faults, lock, stop
        self.out_dir = Path(cfg.outputs.out_dir)
        self.stopped_by: str | None = None
        self._choose_start(cfg, processes)
        self._start_accelerator()
        self._load_data()
        self._build_gan_and_state()
        self._build_tasks()
        self._announce()

    def _choose_start(self, cfg: Config, processes: PartialState) -> None:
        """The checkpoint to resume (the main process decides) and the config it goes on with,
        or the weights a new run starts from (--init-from)."""
        checkpoints = self.out_dir / "checkpoints"
        resume_from = main_decides(
            processes, lambda: find_resume_point(cfg.outputs.resume, checkpoints)
        )
        self.resume_from, self.saved, self.start = resume_from, None, None
        self.changes, self.note = {}, ""
        if resume_from is not None:  # the run's own settings, with what may change changed
            self.saved = read_trainer_state(resume_from)
            model = self.saved.model
            cfg, self.changes, self.note = setup.config_for_resume(cfg, resume_from, model)
        elif cfg.outputs.init_from:  # a new run from trained weights (a resume goes its own way)
            self.start = read_starting_weights(cfg.outputs.init_from)
            cfg, self.note = config_from_source(cfg, self.start), self.start.describe()
        self.cfg = cfg

    def _start_accelerator(self) -> None:
        tc = self.cfg.train
        configure_kernels(tc.deterministic)
        if tc.sync_bn and not torch.cuda.is_available():
            raise UserError(
                "sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernels): drop --sync-bn"
            )
        self.precision = choose_precision(tc.mixed_precision)
        if self.saved is not None and tc.mixed_precision == "auto" and self.saved.precision:
            self.precision = resumed_precision(self.precision, self.saved.precision)
        self.accelerator = setup.make_accelerator(self.cfg, self.precision.name)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            require_writable_dir(self.out_dir, "out_dir")
            clean_unfinished(self.out_dir / "checkpoints")  # a crash's staging: never resumed
        self.accelerator.wait_for_everyone()
        # Before the data: W&B may refuse to start.
        self.start_step = self.saved.step if self.saved is not None else 0
        self.tracking = Tracking(self.accelerator, self.cfg, start_step=self.start_step)

    def _load_data(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        fresh = self.resume_from is None and self.start is None  # else the model has its own
        model = None if fresh else cfg.model
        data = prepare_images(accelerator, cfg.data, cfg.model.resolution, self.out_dir, model)
        self.data_dir, self.files, self.labels = data.data_dir, data.files, data.labels
        if fresh:
            channels = resolve_channels(accelerator, cfg.data.channels, self.files)
            labelled = self.labels.model_fields() if self.labels else {}
            self.cfg = replace(cfg, model=replace(cfg.model, channels=channels, **labelled))
        self.loader = ImageLoader.for_run(self.files, self.cfg, accelerator, self.labels)
        tc = self.cfg.train
        self.total_steps = tc.max_steps or tc.epochs * self.loader.steps_per_epoch
        if self.loader.plan_cache(self.start_step, self.total_steps):
            setup.build_cache(self.loader, accelerator.print)

    def _build_gan_and_state(self) -> None:
        tc, model_cfg, accelerator = self.cfg.train, self.cfg.model, self.accelerator
        self.global_batch = order.global_batch(accelerator.num_processes, tc.batch_size)
        self.gan = build_gan(accelerator, model_cfg, tc, self.start, images=len(self.files))
        num_samples = self.cfg.outputs.num_samples
        self.sample_grid = SampleGrid.fixed(model_cfg, num_samples, tc.seed, accelerator.device)
        if self.resume_from is not None:
            args = (accelerator, self.resume_from, self.saved, self.gan, tc, self.changes)
            self.state = setup.resume(*args)
        else:
            precision, batch = accelerator.mixed_precision, self.global_batch
            self.state = TrainerState(
                step=0, model=model_cfg, global_batch=batch, precision=precision
            )
            set_seed(tc.seed + accelerator.process_index)  # each process draws its own z
        self.progress = setup.progress_bar(self.total_steps, self.state.step, enabled=self.is_main)

    def _build_tasks(self) -> None:
        tc, outputs, accelerator, gan = self.cfg.train, self.cfg.outputs, self.accelerator, self.gan
        self.log = RunLog(self.is_main, self.progress, self.out_dir, self.tracking)
        self.watch = NonfiniteWatch(accelerator.device)
        evaluation = Evaluation(
            self.cfg.eval.eval_every, accelerator, self.log, gan, self.cfg, self.out_dir
        )
        # First: the clock starts below.
        evaluation.prepare(self.files, self.loader.device_id, self.loader.labels)
        self.speed = Throughput(self.global_batch, self.state, tc.compile, accelerator.print)
        per_epoch = self.loader.steps_per_epoch
        self.metrics_log = MetricsLog(
            outputs.log_every, self.log, gan, self.speed, self.watch, per_epoch
        )
        samples = Samples(outputs.sample_every, self.log, gan, self.sample_grid, self.out_dir)
        checkpoints = self.out_dir / "checkpoints"
        saves = Checkpoints(
            outputs.ckpt_every,
            accelerator,
            gan,
            self.speed,
            outputs.keep_checkpoints,
            checkpoints,
            self.lock,
        )
        self.maintenance = [evaluation, samples, saves]  # in this order, with the clock paused
        self.gate = Gate([self.metrics_log, *self.maintenance])

    def _announce(self) -> None:
        """The run's folder, config and start-up line (main process)."""
        if not self.is_main:
            return
        tc, accelerator, out_dir = self.cfg.train, self.accelerator, self.out_dir
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.stop.marker.unlink(missing_ok=True)
        self.cfg.save_toml(out_dir / "config.toml")
        setup.announce_resume(out_dir, self.state.step, self.changes, self.note)
        gray = " (as grayscale)" if self.cfg.model.channels == 1 else ""
        augment = self.gan.augment.mode
        if tc.augment == "auto":
            augment += f" (auto: diffaugment up to {tc.augment_auto_max} images)"
        print(
            f"distgan: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
            f"batch {tc.batch_size}/process (global {self.global_batch}), precision "
            f"{accelerator.mixed_precision} ({self.precision.why}), {len(self.files)} images in "
            f"{self.data_dir}{gray}, flips {'on' if self.loader.flip else 'off'}, "
            f"{self.loader.steps_per_epoch} steps/epoch, augment {augment}, steps "
            f"{self.state.step} -> {self.total_steps}, output {out_dir}",
            flush=True,
        )

    def train(self) -> Path:
        """The loop: the hot path every step; at a gate step the agreement, the log, a rollback
        if the run diverged, and the maintenance that is due; then the end of the run."""
        try:
            while self.state.step < self.total_steps and self.stopped_by is None:
                epoch, start_in_epoch = divmod(self.state.step, self.loader.steps_per_epoch)
                for real, labels in self.loader.labelled_epoch(epoch, start_in_epoch):
                    out = self.train_step(real, labels)
                    step, last = self.state.step, self.state.step == self.total_steps
                    if not (last or self.gate.due(step)):
                        continue

                    verdict = self.reach_agreement(out)
                    stopping = last or verdict.stop is not None
                    if self.metrics_log.due(step, last, stopping):
                        self.metrics_log.run(self.state, verdict)
                    if self.roll_back_if_diverged(verdict):
                        break  # restart the data stream at the checkpoint's position
                    self.maintain(verdict, last, stopping)
                    if stopping:
                        self.stopped_by = None if last else verdict.stop  # at the end: finished
                        break
        finally:
            self.progress.close()  # also on errors: the last line a user sees is the error
        self.finish()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.out_dir

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None) -> StepResult:
        """The hot path: the learning rates, one GAN step and the counters; no host sync."""
        state, tc = self.state, self.cfg.train
        if self.is_main and state.step == 0:
            save_grid(
                real[: self.cfg.outputs.num_samples].clone(), self.out_dir / "samples" / "real.png"
            )
        poison = self.faults.poison(state.step + 1)
        if tc.lr_schedule != "constant":
            factor = lr_factor(tc.lr_schedule, state.step, self.total_steps)
            self.gan.set_learning_rates(tc, state.lr_scale * factor)
        out = gan_step(self.accelerator, tc, self.gan, real, state.step, poison, labels=labels)
        self.watch.record(out.skipped)
        state.step += 1
        state.images_seen += self.global_batch
        self.progress.update(1)
        self.speed.after_step(state.step, out.loss_g)
        self.faults.check(self.accelerator.process_index, state.step)
        return out

    def maintain(self, verdict: Agreement, last: bool, stopping: bool) -> None:
        """The maintenance tasks that are due, in order, with the throughput clock paused."""
        with self.speed.paused():
            for task in self.maintenance:
                if task.due(self.state.step, last, stopping):
                    task.run(self.state, verdict)

    def reach_agreement(self, out) -> Agreement:
        """The gate's one collective (training/stats.py), and ADA's update from it."""
        gan = self.gan
        args = (self.accelerator, out, self.watch, gan.generator_core, self.stop, gan.augment)
        verdict = agree(*args)
        gan.augment.adjust(verdict.real_sign_sum, verdict.real_count)
        return verdict

    def roll_back_if_diverged(self, verdict: Agreement) -> bool:
        """Too many non-finite steps in a row, or G's BatchNorm statistics poisoned (agreed by all
        processes): back to the last good checkpoint with lower learning rates (True), or
        RunStopped, as configured; False while the run is healthy."""
        tc, failures, state, watch = self.cfg.train, self.cfg.failures, self.state, self.watch
        why = divergence(verdict, state.step, failures.nonfinite_limit)
        if why is None:
            return False
        # The main process's view of the folder decides for all: file systems may lag elsewhere.
        newest = [str(path) for path in list_checkpoints(self.out_dir / "checkpoints")[-1:]]
        good = broadcast_object_list(newest or [None])[0]
        if watch.rollbacks == MAX_ROLLBACKS:
            why += f", again after {MAX_ROLLBACKS} rollbacks"
        if failures.on_nonfinite == "stop" or not good or watch.rollbacks == MAX_ROLLBACKS:
            kept = f"the last good checkpoint is {good}" if good else "no checkpoint yet"
            raise RunStopped(f"{why}; {kept}: lower --lr-g/--lr-d, or --on-nonfinite rollback")
        watch.rollbacks += 1
        watch.reset()
        restored = load_checkpoint(self.accelerator, good, self.gan.ema)  # RNG states included
        restored.lr_scale = state.lr_scale * failures.rollback_lr_factor
        restored.best_fid, restored.best_step = state.best_fid, state.best_step  # best/ holds it
        self.gan.set_learning_rates(tc, restored.lr_scale)
        self.gan.augment.restore(restored.aug_p)
        event = {"event": "rollback", "reason": why, "checkpoint": Path(good).name}
        self.tracking.rewind(restored.step)
        self.log.log_metrics({"step": restored.step, **event, "lr_scale": restored.lr_scale})
        self.log.say(
            f"{why}: rolled back to {Path(good).name}, learning rates x{restored.lr_scale:g}"
        )
        self.progress.n = restored.step
        self.state = restored
        self.speed.restart(restored.step)
        return True

    def finish(self) -> None:
        """A stopped run leaves its marker and says how to resume; a finished one checks that all
        processes hold the same weights, then writes the generator and the Hub folder."""
        accelerator, out_dir, state, gan = self.accelerator, self.out_dir, self.state, self.gan
        if self.stopped_by:
            if self.is_main:
                self.stop.write_marker(state.step, self.stopped_by)
                print(
                    f"stopped by {self.stopped_by} at step {state.step}: checkpoint written; the "
                    "same command resumes from it",
                    flush=True,
                )
            return
        discriminator = accelerator.unwrap_model(gan.discriminator)
        modules = {"G": gan.generator_core, "D": discriminator, "EMA G": gan.ema.module}
        check_ddp_consistency(accelerator, modules)
        if not self.is_main:
            return
        if accelerator.num_processes > 1:
            processes = accelerator.num_processes
            print(f"weights identical on all {processes} processes (G, D, EMA G)", flush=True)
        save_generator(out_dir, gan.ema.module, step=state.step, images_seen=state.images_seen)
        from distgan.outputs.hub import save_at_end  # here: only a finished run writes hub/

        save_at_end(out_dir, gan.ema.module, self.cfg, state)
        print(
            f"done: step {state.step}, samples in {out_dir / 'samples'}, generator "
            f"{out_dir / 'generator.safetensors'}",
            flush=True,
        )


def train(cfg: Config, faults: Faults | None = None) -> Path:
    """Train G and D as `cfg` says; return the output folder. Works under `accelerate launch`
    with any number of processes and under plain `python`. `faults`: injected failures (tests)."""
    faults = faults or Faults()
    out_dir = Path(cfg.outputs.out_dir)
    stop = StopRequest(out_dir)  # first: a stop asked for during the set-up is not lost
    stop.install(under_launcher=launched())
    require_usable_cuda()  # else a GPU node would silently train as CPU processes
    require_one_dali_build()
    # The processes first: the main process alone takes the run folder's lock (a second trainer
    # on it stops here) and picks the checkpoint; every process follows.
    processes = setup.start_processes(cfg.failures)
    lock = RunLock(out_dir)
    main_decides(processes, lock.acquire)
    try:  # whatever ends the run, the lock and its heartbeat go (a no-op off the main process)
        return Trainer(cfg, faults, processes, lock, stop).train()
    finally:
        lock.release()
