"""The trainer: set-up, then one loop that reads top to bottom. Accelerate supplies the processes,
DDP and mixed precision; DALI the data; everything written to disk is written by the main process.

The loop runs the hot path (a batch, `gan_step`, counters) and then one gate: most steps go
straight on. At a gate step all processes agree, in one collective, on what the logged numbers
are and on every decision that changes what they do next (stop, roll back); below the gate,
maintenance (metrics, evaluation, samples, checkpoints) decides its own timing.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import (
    Accelerator,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    PartialState,
)
from accelerate.utils import broadcast, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from distgan.config.model import ModelConfig
from distgan.config.sections import (
    Config,
    TrainConfig,
    parse_args,
    resume_config,
    saved_run_config,
)
from distgan.data.faces import default_cache_dir
from distgan.data.loader import ImageLoader, prepare_images, resolve_channels
from distgan.errors import RunStopped, UserError, require_writable_dir
from distgan.metrics import fid as metrics
from distgan.models.augment import Augment
from distgan.models.dcgan import Discriminator, Generator, sample_latents
from distgan.models.ema import EMA
from distgan.models.losses import d_loss, g_loss, gradient_penalty
from distgan.outputs.checkpoint import (
    TrainerState,
    clean_unfinished,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_generator,
)
from distgan.outputs.hub import save_at_end
from distgan.outputs.pretrained import StartingWeights, config_from_source, read_starting_weights
from distgan.outputs.report import append_jsonl, plot_losses, save_grid
from distgan.outputs.runlock import RunLock
from distgan.outputs.tracking import Tracking, make_trackers
from distgan.runtime.env import require_one_dali_build, require_usable_cuda
from distgan.runtime.files import write_json_atomically
from distgan.runtime.launch_env import LauncherPrecision, launcher_precision
from distgan.runtime.signals import STOP_SIGNALS, die_with_parent, ignored
from distgan.training.resume import find_resume_point, main_decides

# Its own signal: the kernel may send it while the dying launcher is still our parent, so the
# signal itself, not getppid(), must say what happened.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
AGREE_EVERY = 10  # steps between the collectives that agree on stopping (at most)
PREEMPTED_MARKER = "preempted.json"
PROGRESS_TO_FILE_SECONDS = 60
CHANGES_FILE = "changes.jsonl"  # settings changed on resume, with the step they took effect
MAX_ROLLBACKS = 5  # then the run stops: halving the learning rates further rarely helps


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX, where bf16 autocast is a real speed-up."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_precision() -> str:
    """bf16 where the GPU computes it natively (Ampere and later); fp16 with loss scaling on
    tensor-core GPUs without it (V100, T4), where torch would emulate bf16 slowly; else fp32."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    major, _ = torch.cuda.get_device_capability()
    return "fp16" if major >= 7 else "no"


def native_precision() -> str:
    """What this machine computes fastest: bf16 or fp16 where native, else no (fp32)."""
    if torch.cuda.is_available():
        return gpu_precision()
    return "bf16" if cpu_has_native_bf16() else "no"


class Precision(NamedTuple):
    """The mixed precision a run trains in, and who chose it (for the start-up line)."""

    name: str  # no, fp16 or bf16
    why: str


def choose_precision(requested: str, launcher: LauncherPrecision | None = None) -> Precision:
    """The precision to run: --mixed-precision if it names one; for `auto`, the launcher's choice
    if it made one (its `--mixed_precision`, or its config file: see runtime/launch_env.py), else
    what the hardware computes fastest (bf16, or fp16 on tensor-core GPUs without bf16), else
    fp32. `launcher` defaults to what this process's launcher was given."""
    has_cuda = torch.cuda.is_available()
    launcher = launcher_precision() if launcher is None else launcher
    if requested != "auto":
        overruled = launcher.choice not in (None, requested)
        why = f"--mixed-precision, over {launcher.source}" if overruled else "--mixed-precision"
    elif launcher.choice is not None:
        requested, why = launcher.for_auto(), f"auto: {launcher.source}"
    else:
        requested = native_precision()
        over = f", over {launcher.source}" if launcher.source else ""
        why = f"auto: native here{over}; --mixed-precision no for fp32"
        if requested == "no":
            why = "auto: no native bf16 or fp16 here"
    if requested == "fp16" and not has_cuda:
        raise UserError(
            f"mixed_precision=fp16 needs a CUDA GPU and none was found ({why}): use bf16 or no"
        )
    return Precision(requested, why)


def resumed_precision(chosen: Precision, trained_in: str) -> Precision:
    """`auto` on resume goes on in the checkpoint's precision: what auto picks can change under
    a run (another launcher line, a requeued job's older script), and a run resumes as trained."""
    if chosen.name == trained_in:
        return chosen
    return Precision(trained_in, f"auto: the checkpoint's; auto would pick {chosen.name} now")


def resolve_mixed_precision(requested: str) -> str:
    """The precision `choose_precision` picks, by name."""
    return choose_precision(requested).name


def configure_kernels(deterministic: bool) -> None:
    """cuDNN's autotuner picks the fastest convolutions for the step's fixed shapes, unless the
    run must repeat bit for bit (then only deterministic kernels; those without one warn)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


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
    return Config(model=model, data=cfg.data, train=cfg.train, given=cfg.given), changes, note


def resume(accelerator, checkpoint: Path, saved: TrainerState, gan: GAN, tc, changes):
    """Load the checkpoint (whose state is `saved`) into G, D, the optimizers, the EMA and the
    RNG, once it is sure to go on as it was trained: the same precision and global batch (the
    data position counts steps). Returns the state to go on with."""
    precision = accelerator.mixed_precision
    global_batch = tc.batch_size * accelerator.num_processes
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


def launched() -> bool:
    """Whether a launcher started this process: `accelerate launch` sets these, plain python not."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_USE_CPU" in os.environ


class StopRequest:
    """Why this process was asked to stop, if it was: one of STOP_SIGNALS, sent to it or passed
    on by the launcher, or the launcher's death. The loop acts on it at the next step that all
    processes agree on; a second Ctrl-C stops at once. A stopped run leaves `marker`, the cue
    for launch/slurm/train.sbatch to requeue the job."""

    def __init__(self, out_dir: Path) -> None:
        self.reason: str | None = None
        self.parent = os.getppid()
        self.marker = Path(os.environ.get("DISTGAN_PREEMPT_MARKER") or out_dir / PREEMPTED_MARKER)

    def install(self, under_launcher: bool) -> None:
        for stop_signal in STOP_SIGNALS:
            if not (stop_signal == signal.SIGHUP and ignored(stop_signal)):  # nohup
                signal.signal(stop_signal, self._received)
        if under_launcher:
            # The kernel signals us when the launcher dies, even by SIGKILL: stop, never orphan.
            signal.signal(PARENT_DEATH_SIGNAL, self._received)
            die_with_parent(PARENT_DEATH_SIGNAL)
            if self._orphaned():  # it died before the request took effect
                self.reason = "the launcher's exit"

    def _orphaned(self) -> bool:
        return os.getppid() != self.parent or self.parent == 1

    def write_marker(self, step: int, stopped_by: str) -> None:
        marker = {"step": step, "signal": stopped_by, "checkpoint": f"step-{step:08d}"}
        write_json_atomically(self.marker, marker)

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.reason is None:
            orphaned = signum == PARENT_DEATH_SIGNAL
            self.reason = "the launcher's exit" if orphaned else signal.Signals(signum).name


@dataclass(kw_only=True)
class Faults:
    """Fault injection for the tests of failure handling, read once from the environment:
    DISTGAN_INJECT_FAULT="RANK:STEP" makes that process raise at that step, and
    DISTGAN_INJECT_NAN="STEP:COUNT" makes the losses of COUNT steps from STEP non-finite, once
    each (a rollback replays those steps cleanly)."""

    raise_at: tuple[int, int] | None = None
    nan_steps: set[int] | None = None

    @classmethod
    def from_env(cls, environ=os.environ) -> Faults:
        fault, nan = environ.get("DISTGAN_INJECT_FAULT"), environ.get("DISTGAN_INJECT_NAN")
        first, count = map(int, nan.split(":")) if nan else (0, 0)
        raise_at = tuple(map(int, fault.split(":"))) if fault else None
        return cls(raise_at=raise_at, nan_steps=set(range(first, first + count)))

    def poison(self, step: int) -> float:
        """The factor on the losses of `step`: NaN once for an injected step, else 1."""
        if self.nan_steps and step in self.nan_steps:
            self.nan_steps.discard(step)
            return float("nan")
        return 1.0

    def check(self, rank: int, step: int) -> None:
        if self.raise_at == (rank, step):
            raise RuntimeError(f"injected fault at step {step} (DISTGAN_INJECT_FAULT)")


class NonfiniteWatch:
    """Steps skipped for non-finite losses or gradients, counted on the device (no host sync),
    read only in the agreement; and the rollbacks done so far."""

    def __init__(self, device: torch.device):
        self.skipped, self.streak, self.worst = (torch.zeros((), device=device) for _ in range(3))
        self.rollbacks = 0

    def record(self, bad_step: torch.Tensor) -> None:
        self.skipped += bad_step
        self.streak = (self.streak + bad_step) * bad_step
        torch.maximum(self.worst, self.streak, out=self.worst)

    def counts(self, generator: Generator) -> list[torch.Tensor]:
        """[skipped steps, longest streak, 1 if G's BatchNorm statistics are not finite]: a
        skipped step leaves the weights alone, but a non-finite forward pass still poisons them."""
        finite = torch.stack([torch.isfinite(b).all() for b in generator.buffers()]).all()
        return [self.skipped, self.worst, (~finite).float()]

    def window_done(self) -> None:
        """After a log line: count afresh, keeping the streak that is still running."""
        self.skipped.zero_()
        self.worst.copy_(self.streak)

    def reset(self) -> None:
        for counter in (self.skipped, self.streak, self.worst):
            counter.zero_()


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
        rate = (
            (step - self.window_step)
            * self.global_batch
            / (self._window_seconds() - self.paused_seconds)
        )
        self.restart(step)
        return rate

    def wall_time(self) -> float:
        return round(self.wall_before + time.perf_counter() - self.started, 2)


class Agreement(NamedTuple):
    """What every process knows after a gate step's one collective."""

    loss_d: float
    loss_g: float
    d_real: float  # mean sigmoid(D) on real images
    d_fake: float  # and on generated ones
    skipped_steps: int  # since the last log line
    longest_streak: int  # of consecutive skipped steps
    buffers_finite: bool  # G's BatchNorm statistics, on every process
    stop: str | None  # why the run stops here, or None
    real_sign_sum: float  # sum of sign(D(real)) since the last gate, all processes (ada only)
    real_count: int  # how many logits that sum has


class StepResult(NamedTuple):
    """What `gan_step` leaves on the device (nothing is read back: no host sync)."""

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    skipped: torch.Tensor  # 1.0 if the step was skipped for non-finite gradients, else 0.0


def agree(
    accelerator: Accelerator, out: StepResult, watch: NonfiniteWatch, generator, stop, augment
):
    """The gate's one collective: every process's logged numbers, non-finite counts, stop
    request and ADA sums, gathered; then every process derives the same Agreement from the same
    table."""
    local = torch.stack(
        [
            out.loss_d.detach().float(),
            out.loss_g.detach().float(),
            torch.sigmoid(out.real_logits.detach().float()).mean(),
            torch.sigmoid(out.fake_logits.detach().float()).mean(),
            *watch.counts(generator),
            torch.tensor(float(stop.reason is not None), device=out.loss_d.device),
            *augment.counts(),
        ]
    )
    table = accelerator.gather(local[None]).cpu()  # [processes, 10]
    means, worst = table[:, :4].mean(0).tolist(), table[:, 4:8].amax(0).tolist()
    real_sign_sum, real_count = table[:, 8:].sum(0).tolist()
    stop_reason = None
    if worst[3]:
        stop_reason = stop.reason or "a signal to another process"
    counts = (int(worst[0]), int(worst[1]), not worst[2])
    return Agreement(*means, *counts, stop_reason, real_sign_sum, int(real_count))


def nonfinite(module: torch.nn.Module) -> torch.Tensor:
    """1.0 if any gradient of `module` is inf/NaN, else 0.0, as a device tensor (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()


def divergence(verdict: Agreement, step: int, limit: int) -> str | None:
    """Why the run cannot go on as it is, or None."""
    if not verdict.buffers_finite:
        return f"non-finite BatchNorm statistics in G at step {step}"
    if verdict.longest_streak >= limit:
        return f"{verdict.longest_streak} consecutive non-finite steps up to step {step}"
    return None


def check_ddp_consistency(accelerator: Accelerator, modules: dict) -> None:
    """Every process must hold bitwise the same weights (stylegan2-ada's check): a divergence
    means a bug in the distributed setup, so stop rather than write a wrong generator."""
    if accelerator.num_processes == 1:
        return
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            gathered = accelerator.gather(param.detach().reshape(1, -1))
            if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
                raise RuntimeError(f"{module_name}.{name} differs between processes")


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
) -> GAN:
    """The same initial G and D on every process (DDP also broadcasts them), in the memory layout
    chosen, with fused Adam: one kernel per step, and it skips a step on the device when told its
    gradients are not finite (`found_inf`). `start` (--init-from): the weights G, D and the EMA
    start from instead of the init."""
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
    augment = Augment(tc.augment, **strengths, device=accelerator.device)
    return GAN(
        **models, opt_g=opt_g, opt_d=opt_d, generator_core=generator_core, ema=ema, augment=augment
    )


def gan_step(accelerator, tc: TrainConfig, gan: GAN, real, step: int, poison=1.0) -> StepResult:
    """One D step and one G step on a batch of real images, then the EMA update: all queued on
    the device, with no host sync. `poison` multiplies the losses (NaN for fault injection)."""
    generator, discriminator = gan.generator, gan.discriminator
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    real = real.contiguous(memory_format=layout)
    z = sample_latents(gan.generator_core.config, real.shape[0], device=real.device)
    fake = generator(z)

    # D step: real and fake losses summed, one backward. fake is detached: no G grads. D sees
    # every image through the augmentation (none: the images themselves).
    discriminator.requires_grad_(True)
    real_seen, fake_seen = gan.augment(real), gan.augment(fake.detach())
    real_logits = discriminator(real_seen)
    fake_logits = discriminator(fake_seen)
    gan.augment.record(real_logits)
    loss_d = d_loss(tc.loss, real_logits, fake_logits, tc.real_label) * poison
    if tc.loss == "wgan-gp":
        # D is kept 1-Lipschitz where it is trained: between the images it sees.
        penalty = gradient_penalty(discriminator, real_seen, fake_seen, accelerator.scaler)
        loss_d = loss_d + tc.gp_weight * penalty
    gan.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    scaled = accelerator.scaler is not None  # fp16: the GradScaler skips overflowing steps
    if not scaled:
        bad_d = gan.opt_d.optimizer.found_inf = nonfinite(discriminator)
    gan.opt_d.step()

    # G step: D is frozen, so it collects no gradients and DDP reduces none of D's.
    discriminator.requires_grad_(False)
    loss_g = g_loss(tc.loss, discriminator(gan.augment(fake))) * poison
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


@dataclass(kw_only=True)
class Run:
    """What the maintenance below the loop's gate works with, built once before the loop (the
    FID extractor and real statistics only with --eval-every)."""

    accelerator: Accelerator
    cfg: Config
    gan: GAN
    loader: ImageLoader
    out_dir: Path
    progress: tqdm
    fixed_z: torch.Tensor
    tracking: Tracking
    extractor: metrics.FeatureExtractor | None = None
    real_stats: metrics.Stats | None = None
    lock: RunLock | None = None
    """The run folder's lock (held by the main process): checked before each checkpoint."""

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, line: str) -> None:
        """A line on the terminal (above the progress bar), from the main process."""
        if self.is_main:
            self.progress.write(line)

    def log_metrics(self, values: dict, section: str = "train") -> None:
        """A line of metrics.jsonl, from the main process; its numbers go to the trackers, named
        `section`/key."""
        if self.is_main:
            append_jsonl(self.metrics_path, values)
            self.tracking.log(values, section)


def gate_due(tc: TrainConfig, step: int) -> bool:
    """Whether `step` is one where the processes agree (and maintenance may run): the same
    answer on every process, from the step number alone."""
    every = [min(tc.log_every, AGREE_EVERY), tc.sample_every, tc.ckpt_every, tc.eval_every]
    return any(n and step % n == 0 for n in every)


def log_step(run: Run, state, verdict: Agreement, speed: Throughput, watch: NonfiniteWatch, last):
    """A metrics.jsonl line and the progress bar, every log_every steps; the speed and the
    skipped steps count afresh from each line."""
    if not (state.step % run.cfg.train.log_every == 0 or last):
        return
    watch.window_done()
    images_per_sec = speed.images_per_sec(state.step)
    run.log_metrics(
        {
            "step": state.step,
            "epoch": round(state.step / run.loader.steps_per_epoch, 4),
            "images_seen": state.images_seen,
            "loss_d": verdict.loss_d,
            "loss_g": verdict.loss_g,
            "d_real": verdict.d_real,
            "d_fake": verdict.d_fake,
            "images_per_sec": round(images_per_sec, 2),
            "lr_g": run.gan.opt_g.param_groups[0]["lr"],
            "lr_d": run.gan.opt_d.param_groups[0]["lr"],
            "skipped_steps": verdict.skipped_steps,
            **run.gan.augment.metrics(),
            "wall_time": speed.wall_time(),
        }
    )
    losses = {"loss_d": f"{verdict.loss_d:.3f}", "loss_g": f"{verdict.loss_g:.3f}"}
    run.progress.set_postfix(**losses, img_s=f"{images_per_sec:.0f}", refresh=False)
    if verdict.skipped_steps:
        what = f"{verdict.skipped_steps} step(s) with non-finite losses or gradients"
        run.say(f"step {state.step}: skipped {what}")


def rollback_or_stop(run: Run, state: TrainerState, verdict: Agreement, watch: NonfiniteWatch):
    """Too many non-finite steps in a row, or G's BatchNorm statistics poisoned (agreed by all
    processes): the state of the last good checkpoint with lower learning rates, or RunStopped,
    as configured; None while the run is healthy."""
    tc = run.cfg.train
    why = divergence(verdict, state.step, tc.nonfinite_limit)
    if why is None:
        return None
    # The main process's view of the folder decides for all: file systems may lag elsewhere.
    newest = [str(path) for path in list_checkpoints(run.checkpoints)[-1:]] or [None]
    good = broadcast_object_list(newest)[0]
    if watch.rollbacks == MAX_ROLLBACKS:
        why += f", again after {MAX_ROLLBACKS} rollbacks"
    if tc.on_nonfinite == "stop" or not good or watch.rollbacks == MAX_ROLLBACKS:
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint yet"
        raise RunStopped(f"{why}; {kept}: lower --lr-g/--lr-d, or --on-nonfinite rollback")
    watch.rollbacks += 1
    watch.reset()
    restored = load_checkpoint(run.accelerator, good, run.gan.ema)  # RNG states included
    restored.lr_scale = state.lr_scale * tc.rollback_lr_factor
    restored.best_fid, restored.best_step = state.best_fid, state.best_step  # best/ holds it
    run.gan.set_learning_rates(tc, restored.lr_scale)
    run.gan.augment.restore(restored.aug_p)
    event = {"event": "rollback", "reason": why, "checkpoint": Path(good).name}
    run.tracking.rewind(restored.step)
    run.log_metrics({"step": restored.step, **event, "lr_scale": restored.lr_scale})
    run.say(f"{why}: rolled back to {Path(good).name}, learning rates x{restored.lr_scale:g}")
    run.progress.n = restored.step
    return restored


def evaluate_ema(run: Run, state: TrainerState, last: bool) -> None:
    """FID/KID of the EMA generator every eval_every steps; the best one is kept in best/."""
    tc, accelerator = run.cfg.train, run.accelerator
    if not tc.eval_every or not (state.step % tc.eval_every == 0 or last):
        return
    ema = run.gan.ema.module
    # One generator for all processes: main's BN statistics (the weights are identical).
    for buffer in ema.buffers():
        buffer.copy_(broadcast(buffer.clone(), from_process=0))
    options = {"batch_size": tc.batch_size, "seed": tc.seed + 1, "device": accelerator.device}
    result = metrics.score(
        accelerator, run.extractor, ema, run.real_stats, count=tc.eval_num, **options
    )
    if state.best_fid is None or result["fid"] < state.best_fid:
        state.best_fid, state.best_step = result["fid"], state.step
        if run.is_main:
            save_generator(
                run.out_dir / "best", ema, step=state.step, images_seen=state.images_seen
            )
    result["eval_seconds"] = result.pop("seconds")
    best = {"best_fid": state.best_fid, "best_step": state.best_step}
    run.log_metrics({"step": state.step, **result, **best}, section="eval")
    run.say(
        f"step {state.step}: FID {result['fid']:.3f} KID {result['kid_mean']:.5f} (best FID "
        f"{state.best_fid:.3f} at step {state.best_step}; {run.extractor.name}, "
        f"{result['n_fake']} fake vs {result['n_real']} real)"
    )


def write_samples(run: Run, state: TrainerState, last: bool) -> None:
    """The EMA generator on the fixed z every sample_every steps, and the loss plot."""
    if not run.is_main or not (state.step % run.cfg.train.sample_every == 0 or last):
        return
    with torch.no_grad():
        samples = run.gan.ema.module(run.fixed_z)
    pixels = save_grid(samples, run.out_dir / "samples" / f"step-{state.step:08d}.png")
    run.tracking.log_image("samples", pixels, state.step)
    plot_losses(run.metrics_path, run.out_dir / "losses.png")


def checkpoint_if_due(run: Run, state: TrainerState, speed: Throughput, now: bool) -> None:
    """A checkpoint every ckpt_every steps, and `now` (the last step, or a stop)."""
    tc = run.cfg.train
    if not (state.step % tc.ckpt_every == 0 or now):
        return
    state.wall_time, state.aug_p = speed.wall_time(), run.gan.augment.p
    save_checkpoint(
        run.accelerator,
        run.checkpoints,
        run.gan.ema,
        state,
        keep=tc.keep_checkpoints,
        ensure_held=run.lock.ensure_held if run.lock is not None else None,
    )


def finish(run: Run, state: TrainerState, stop: StopRequest, stopped_by: str | None) -> None:
    """A stopped run leaves its marker and says how to resume; a finished one checks that all
    processes hold the same weights, then writes the generator."""
    accelerator, out_dir = run.accelerator, run.out_dir
    if stopped_by:
        if run.is_main:
            stop.write_marker(state.step, stopped_by)
            print(
                f"stopped by {stopped_by} at step {state.step}: checkpoint written; the same "
                "command resumes from it",
                flush=True,
            )
        return
    discriminator = accelerator.unwrap_model(run.gan.discriminator)
    modules = {"G": run.gan.generator_core, "D": discriminator, "EMA G": run.gan.ema.module}
    check_ddp_consistency(accelerator, modules)
    if run.is_main:
        if accelerator.num_processes > 1:
            processes = accelerator.num_processes
            print(f"weights identical on all {processes} processes (G, D, EMA G)", flush=True)
        save_generator(out_dir, run.gan.ema.module, step=state.step, images_seen=state.images_seen)
        save_at_end(out_dir, run.gan.ema.module, run.cfg, state)  # hub/: the Hub model folder
        generator_file = out_dir / "generator.safetensors"
        print(
            f"done: step {state.step}, samples in {out_dir / 'samples'}, generator "
            f"{generator_file}",
            flush=True,
        )


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


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A live bar on a terminal; when stderr is a file (SLURM's log, a redirect), an update at
    most every PROGRESS_TO_FILE_SECONDS, so a long job's log stays small."""
    every = 0.1 if sys.stderr.isatty() else PROGRESS_TO_FILE_SECONDS
    options = {"unit": "step", "mininterval": every, "disable": not enabled}
    return tqdm(total=total, initial=initial, **options)


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


def start_processes(tc: TrainConfig) -> PartialState:
    """Accelerate's processes and their group, before the Accelerator (whose precision may come
    from the checkpoint the main process picks), which joins them."""
    timeout = timedelta(seconds=tc.dist_timeout)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def make_accelerator(tc: TrainConfig, mixed_precision: str) -> Accelerator:
    """Accelerate's processes, DDP and autocast (in `mixed_precision`) as the config says."""
    # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which Accelerate's kwargs
    # handler cannot pass yet; its own text says to keep broadcast_buffers=False for local buffers.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    # D runs three times per step (real, fake, fake for G) with BatchNorm: broadcasting buffers
    # on each forward would break autograd, so every process keeps its own BN statistics.
    handlers = [
        DistributedDataParallelKwargs(broadcast_buffers=False),
        InitProcessGroupKwargs(timeout=timedelta(seconds=tc.dist_timeout)),
    ]
    trackers = make_trackers(tc.report_to, Path(tc.out_dir))  # started on the main process
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),  # without it, CPU processes would not form a group
        kwargs_handlers=handlers,
        log_with=trackers or None,  # an empty list makes Accelerate warn of missing trackers
    )


def prepare_fid(run: Run, files: list[str]) -> None:
    """The feature extractor and the real statistics (cached) for evaluation during training."""
    tc, dc, accelerator = run.cfg.train, run.cfg.data, run.accelerator
    if not tc.eval_every:
        return
    run.extractor = metrics.make_extractor(
        tc.eval_features, tc.inception_weights, accelerator.device
    )
    run.real_stats = metrics.reference_stats(
        accelerator,
        run.extractor,
        metrics.real_files(files, tc.eval_real_num),
        cache_dir=dc.cache_dir or default_cache_dir(),
        log=accelerator.print,
        resolution=run.cfg.model.resolution,
        crop_box=dc.crop_box,
        batch_size=tc.batch_size,
        num_threads=dc.num_threads,
        device_id=run.loader.device_id,
        channels=run.cfg.model.channels,
    )


def train(cfg: Config, faults: Faults | None = None) -> Path:
    """Train G and D as `cfg` says; return the output folder. Works under `accelerate launch`
    with any number of processes and under plain `python`. `faults`: injected failures (tests)."""
    faults = faults or Faults()
    out_dir = Path(cfg.train.out_dir)
    stop = StopRequest(out_dir)  # first: a stop asked for during the set-up is not lost
    stop.install(under_launcher=launched())
    require_usable_cuda()  # else a GPU node would silently train as CPU processes
    require_one_dali_build()
    # The processes first: the main process alone takes the run folder's lock (a second trainer
    # on it stops here) and picks the checkpoint; every process follows.
    processes = start_processes(cfg.train)
    lock = RunLock(out_dir)
    main_decides(processes, lock.acquire)
    try:  # whatever ends the run, the lock and its heartbeat go (a no-op off the main process)
        return train_holding_lock(cfg, faults, processes, lock, stop)
    finally:
        lock.release()


def train_holding_lock(
    cfg: Config, faults: Faults, processes: PartialState, lock: RunLock, stop: StopRequest
) -> Path:
    """The rest of `train`, once the main process holds the run folder's `lock`."""
    out_dir = Path(cfg.train.out_dir)
    checkpoints = out_dir / "checkpoints"
    resume_from = main_decides(processes, lambda: find_resume_point(cfg.train.resume, checkpoints))
    changes, note, start = {}, "", None
    if resume_from is not None:  # the run's own settings, with what may change changed
        saved = read_trainer_state(resume_from)
        cfg, changes, note = config_for_resume(cfg, resume_from, saved.model)
    elif cfg.train.init_from:  # a new run from trained weights (a resume goes on from its own)
        start = read_starting_weights(cfg.train.init_from)
        cfg, note = config_from_source(cfg, start), start.describe()
    tc, dc, model_cfg = cfg.train, cfg.data, cfg.model
    configure_kernels(tc.deterministic)
    if tc.sync_bn and not torch.cuda.is_available():
        raise UserError(
            "sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernels): drop --sync-bn"
        )
    chosen = choose_precision(tc.mixed_precision)
    if resume_from is not None and tc.mixed_precision == "auto" and saved.precision:
        chosen = resumed_precision(chosen, saved.precision)
    accelerator = make_accelerator(tc, chosen.name)
    device, is_main = accelerator.device, accelerator.is_main_process
    if is_main:
        require_writable_dir(out_dir, "out_dir")
        clean_unfinished(out_dir / "checkpoints")  # staging folders of a crash: never resumed
    accelerator.wait_for_everyone()
    # Before the data: W&B may refuse to start.
    tracking = Tracking(accelerator, cfg, start_step=saved.step if resume_from is not None else 0)

    data_dir, files = prepare_images(accelerator, dc, model_cfg.resolution, out_dir)
    if resume_from is None and start is None:  # a checkpoint's or source's model has its own
        channels = resolve_channels(accelerator, dc.channels, files)
        cfg = replace(cfg, model=replace(model_cfg, channels=channels))
        model_cfg = cfg.model
    loader = ImageLoader.for_run(files, cfg, accelerator)
    if dc.decoded_cache == "auto":
        build_cache(loader, accelerator.print)
    global_batch = tc.batch_size * accelerator.num_processes
    total_steps = tc.max_steps or tc.epochs * loader.steps_per_epoch
    gan = build_gan(accelerator, model_cfg, tc, start)
    seeded = torch.Generator().manual_seed(tc.seed)
    fixed_z = sample_latents(model_cfg, tc.num_samples, generator=seeded).to(device)
    if resume_from is not None:
        state = resume(accelerator, resume_from, saved, gan, tc, changes)
    else:
        precision = accelerator.mixed_precision
        state = TrainerState(
            step=0, model=model_cfg, global_batch=global_batch, precision=precision
        )
        set_seed(tc.seed + accelerator.process_index)  # each process draws its own z
    progress = progress_bar(total_steps, state.step, enabled=is_main)
    parts = {"cfg": cfg, "gan": gan, "loader": loader, "progress": progress, "fixed_z": fixed_z}
    run = Run(accelerator=accelerator, out_dir=out_dir, tracking=tracking, lock=lock, **parts)
    prepare_fid(run, files)

    if is_main:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        stop.marker.unlink(missing_ok=True)
        cfg.save_toml(out_dir / "config.toml")
        announce_resume(out_dir, state.step, changes, note)
        print(
            f"distgan: {accelerator.num_processes} process(es) on {device.type}, batch "
            f"{tc.batch_size}/process (global {global_batch}), precision "
            f"{accelerator.mixed_precision} ({chosen.why}), {len(files)} images in {data_dir}"
            f"{' (as grayscale)' if model_cfg.channels == 1 else ''}, flips "
            f"{'on' if loader.flip else 'off'}, {loader.steps_per_epoch} steps/epoch, steps "
            f"{state.step} -> {total_steps}, output {out_dir}",
            flush=True,
        )
    watch = NonfiniteWatch(device)
    speed = Throughput(global_batch, state, tc.compile, accelerator.print)
    stopped_by = None

    try:
        while state.step < total_steps and stopped_by is None:
            epoch, start_in_epoch = divmod(state.step, loader.steps_per_epoch)
            for real in loader.epoch(epoch, start_in_epoch):
                if is_main and state.step == 0:
                    save_grid(real[: tc.num_samples].clone(), out_dir / "samples" / "real.png")
                poison = faults.poison(state.step + 1)
                if tc.lr_schedule != "constant":
                    factor = lr_factor(tc.lr_schedule, state.step, total_steps)
                    gan.set_learning_rates(tc, state.lr_scale * factor)
                out = gan_step(accelerator, tc, gan, real, state.step, poison)
                watch.record(out.skipped)
                state.step += 1
                state.images_seen += global_batch
                progress.update(1)
                speed.after_step(state.step, out.loss_g)
                faults.check(accelerator.process_index, state.step)
                last = state.step == total_steps
                if not (last or gate_due(tc, state.step)):
                    continue

                verdict = agree(accelerator, out, watch, gan.generator_core, stop, gan.augment)
                gan.augment.adjust(verdict.real_sign_sum, verdict.real_count)
                log_step(run, state, verdict, speed, watch, last)
                restored = rollback_or_stop(run, state, verdict, watch)
                if restored is not None:
                    state = restored
                    speed.restart(state.step)
                    break  # restart the data stream at the checkpoint's position
                with speed.paused():
                    evaluate_ema(run, state, last)
                    write_samples(run, state, last)
                    checkpoint_if_due(run, state, speed, now=last or verdict.stop is not None)
                if last or verdict.stop:
                    stopped_by = None if last else verdict.stop  # a stop at the end: finished
                    break
    finally:
        progress.close()  # also on errors: the last line a user sees is the error
    finish(run, state, stop, stopped_by)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv), Faults.from_env())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once, without a checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # Name the process: under a launcher the first failure is the one that matters, and the
        # launcher then stops the other processes (or they time out of their next collective).
        rank = os.environ.get("RANK", "0")
        message = f"error: process {rank} failed: {type(err).__name__}: {err}"
        print(message, file=sys.stderr, flush=True)
        raise
