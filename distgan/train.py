"""The training loop: one function, top to bottom. Accelerate supplies the processes, DDP and
mixed precision; DALI the data; everything written to disk is written by the main process."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import broadcast, gather_object, set_seed
from tqdm.auto import tqdm

from distgan import metrics
from distgan.checkpoint import (
    clean_unfinished,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_generator,
)
from distgan.config import Config, DataConfig, TrainConfig, parse_args
from distgan.data import ImageLoader, find_images, scan_cache_path, scan_images
from distgan.ema import EMA
from distgan.errors import RunStopped, UserError, require_writable_dir
from distgan.faces import builtin_faces_dir, default_cache_dir, ensure_builtin_faces
from distgan.losses import d_loss, g_loss, gradient_penalty
from distgan.models import Discriminator, Generator, ModelConfig
from distgan.report import append_jsonl, plot_losses, save_grid

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_CHECK_EVERY = 10  # steps between the collective that agrees on stopping (several processes)
PREEMPTED_MARKER = "preempted.json"
BAD_IMAGES_FILE = "bad_images.txt"
MAX_ROLLBACKS = 5  # then the run stops: halving the learning rates further rarely helps


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX, where bf16 autocast is a real speed-up."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(requested: str) -> str:
    """The precision to run: `auto` takes the launcher's choice if it made one (other than "no"),
    else bf16 where the hardware computes it natively, else full fp32."""
    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher != "no":
            requested = launcher
        elif has_cuda:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            requested = "bf16" if cpu_has_native_bf16() else "no"
    if requested == "fp16" and not has_cuda:
        raise UserError("mixed_precision=fp16 needs a CUDA GPU and none was found: use bf16 or no")
    return requested


def find_resume_point(resume: str, checkpoints_root: Path) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh run."""
    existing = list_checkpoints(checkpoints_root)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise UserError(
                f"{checkpoints_root.parent} already holds a run (checkpoints up to "
                f"{existing[-1].name}): continue it with --resume auto, or pick a new --out-dir"
            )
        return None
    read_trainer_state(resume)  # checks that it is a complete checkpoint
    return Path(resume)


def prepare_images(accelerator: Accelerator, dc: DataConfig, resolution: int, out_dir: Path):
    """(data folder, usable image files). Renders the built-in faces once per machine; scans the
    files for ones DALI cannot decode (each process a share, in parallel) and stops with the list,
    or skips them, as --on-bad-image says."""
    data_dir = dc.data_dir
    if data_dir is None:
        render_size = max(128, resolution)
        if accelerator.is_local_main_process:
            if not builtin_faces_dir(dc.builtin_faces, render_size, dc.cache_dir).is_dir():
                print(f"rendering {dc.builtin_faces} built-in faces (once) ...", flush=True)
            ensure_builtin_faces(dc.builtin_faces, render_size, dc.cache_dir)
        accelerator.wait_for_everyone()
        data_dir = ensure_builtin_faces(dc.builtin_faces, render_size, dc.cache_dir)
    try:
        files = find_images(data_dir)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None

    rank, world = accelerator.process_index, accelerator.num_processes
    share = files[rank::world]
    cache = scan_cache_path(
        dc.cache_dir or default_cache_dir(), files, dc.crop_box, f"{rank}of{world}"
    )
    workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    found = scan_images(share, dc.crop_box, workers=workers, cache_path=cache)
    bad = {path: reason for part in gather_object([found]) for path, reason in part.items()}
    if not bad:
        return data_dir, files
    if accelerator.is_main_process:
        listing = "".join(f"{path}: {reason}\n" for path, reason in sorted(bad.items()))
        (out_dir / BAD_IMAGES_FILE).write_text(listing)
    first = "; ".join(f"{Path(p).name}: {r}" for p, r in sorted(bad.items())[:3])
    summary = f"{len(bad)} of {len(files)} images in {data_dir} cannot be used ({first}"
    summary += ", ...)" if len(bad) > 3 else ")"
    if dc.on_bad_image == "error":
        raise UserError(
            f"{summary}, all listed in {out_dir / BAD_IMAGES_FILE}: fix or remove them, or pass "
            "--on-bad-image skip to train on the rest"
        )
    usable = [f for f in files if f not in bad]
    if not usable:
        raise UserError(f"{summary}: no usable image is left in {data_dir}")
    accelerator.print(f"skipping {summary}; listed in {out_dir / BAD_IMAGES_FILE}")
    return data_dir, usable


def prepare_fid(accelerator, tc, dc, files, resolution: int, device_id):
    """The feature extractor and the real statistics (cached), or (None, None) without eval."""
    if not tc.eval_every:
        return None, None
    device = accelerator.device
    extractor = metrics.make_extractor(tc.eval_features, tc.inception_weights, device)
    reference = metrics.real_files(files, tc.eval_real_num)
    cache_dir = dc.cache_dir or default_cache_dir()
    stats_path = metrics.real_stats_path(
        cache_dir, reference, resolution, dc.crop_box, extractor.name
    )
    real_stats = metrics.load_stats(stats_path)
    have = torch.tensor([float(real_stats is not None)], device=device)
    if accelerator.reduce(have, "sum").item() < accelerator.num_processes:  # all, or none, load
        accelerator.print(f"computing real statistics of {len(reference)} images (once) ...")
        real_stats = metrics.real_stats(
            accelerator, extractor, reference, resolution=resolution, crop_box=dc.crop_box,
            batch_size=tc.batch_size, num_threads=dc.num_threads, device_id=device_id,
        )  # fmt: skip
        if accelerator.is_main_process:
            metrics.save_stats(stats_path, real_stats)
    return extractor, real_stats


def catch_stop_signals() -> dict:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, or the launcher
    stopping its workers) ask the loop to finish its step, checkpoint and exit."""
    received = {"signal": None}

    def remember(signum, _frame):
        received["signal"] = signal.Signals(signum).name

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, remember)
    return received


def injected_faults() -> tuple[tuple[int, int] | None, set[int]]:
    """Fault injection for the tests of failure handling:
    DISTGAN_INJECT_FAULT="RANK:STEP" makes that process raise at that step, and
    DISTGAN_INJECT_NAN="STEP:COUNT" makes the losses of COUNT steps from STEP non-finite, once
    each (a rollback replays those steps cleanly)."""
    fault = os.environ.get("DISTGAN_INJECT_FAULT")
    nan = os.environ.get("DISTGAN_INJECT_NAN")
    rank_step = tuple(map(int, fault.split(":"))) if fault else None
    first, count = map(int, nan.split(":")) if nan else (0, 0)
    return rank_step, set(range(first, first + count))


def nonfinite(module: torch.nn.Module) -> torch.Tensor:
    """1.0 if any gradient of `module` is inf/NaN, else 0.0, as a device tensor (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()


def finite_buffers(module: torch.nn.Module) -> bool:
    """Whether BatchNorm statistics are finite: a step skipped for non-finite gradients leaves
    the weights alone, but a non-finite forward pass can still poison the running statistics."""
    return all(bool(torch.isfinite(buffer).all()) for buffer in module.buffers())


def divergence(longest_streak: int, buffers_finite: bool, step: int, limit: int) -> str | None:
    """Why the run cannot go on as it is, or None."""
    if not buffers_finite:
        return f"non-finite BatchNorm statistics in G at step {step}"
    if longest_streak >= limit:
        return f"{longest_streak} consecutive non-finite steps up to step {step}"
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


def build_gan(accelerator: Accelerator, model_cfg: ModelConfig, tc: TrainConfig) -> GAN:
    """The same initial G and D on every process (DDP also broadcasts them), in the memory layout
    chosen, with fused Adam: one kernel per step, and it skips a step on the device when told its
    gradients are not finite (`found_inf`)."""
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
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr_g, betas=betas, fused=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d, betas=betas, fused=True)
    generator, discriminator, opt_g, opt_d = accelerator.prepare(
        generator, discriminator, opt_g, opt_d
    )
    generator_core = accelerator.unwrap_model(generator)
    if tc.compile:  # around DDP, as PyTorch advises: the graph is split at gradient buckets
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    return GAN(generator=generator, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d,
               generator_core=generator_core, ema=ema)  # fmt: skip


def gan_step(
    accelerator: Accelerator, tc: TrainConfig, gan: GAN, real: torch.Tensor, step: int,
    poison: float = 1.0,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """One D step and one G step on a batch of real images, then the EMA update: all queued on
    the device, with no host sync. `poison` multiplies the losses (NaN for fault injection).
    Returns device tensors: loss_d, loss_g, real_logits, fake_logits, and 1.0 if the step was
    skipped for non-finite gradients, else 0.0."""
    generator, discriminator = gan.generator, gan.discriminator
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    real = real.contiguous(memory_format=layout)
    z = torch.randn(real.shape[0], gan.generator_core.config.z_dim, device=real.device)
    fake = generator(z)

    # D step: real and fake losses summed, one backward. fake is detached: no G grads.
    discriminator.requires_grad_(True)
    real_logits = discriminator(real)
    fake_logits = discriminator(fake.detach())
    loss_d = d_loss(tc.loss, real_logits, fake_logits, tc.real_label) * poison
    if tc.loss == "wgan-gp":
        penalty = gradient_penalty(discriminator, real, fake, accelerator.scaler)
        loss_d = loss_d + tc.gp_weight * penalty
    gan.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    bad_d = nonfinite(discriminator)
    if accelerator.scaler is None:  # fp16's GradScaler does its own skipping
        gan.opt_d.optimizer.found_inf = bad_d
    gan.opt_d.step()

    # G step: D is frozen, so it collects no gradients and DDP reduces none of D's.
    discriminator.requires_grad_(False)
    loss_g = g_loss(tc.loss, discriminator(fake)) * poison
    gan.opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    bad_g = nonfinite(generator)
    if accelerator.scaler is None:
        gan.opt_g.optimizer.found_inf = bad_g
    gan.opt_g.step()
    gan.ema.update(gan.generator_core, step)
    return loss_d, loss_g, real_logits, fake_logits, torch.maximum(bad_d, bad_g)


def train(cfg: Config) -> Path:
    """Train G and D as `cfg` says; return the output folder. Works under `accelerate launch`
    with any number of processes and under plain `python`."""
    tc, dc = cfg.train, cfg.data
    mixed_precision = resolve_mixed_precision(tc.mixed_precision)
    if tc.sync_bn and not torch.cuda.is_available():
        raise UserError(
            "sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernels): drop --sync-bn"
        )
    # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which Accelerate's kwargs
    # handler cannot pass yet; its own text says to keep broadcast_buffers=False for local buffers.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    # D runs three times per step (real, fake, fake for G) with BatchNorm: broadcasting buffers
    # on each forward would break autograd, so every process keeps its own BN statistics.
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),  # without it, CPU processes would not form a group
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=tc.dist_timeout)),
        ],
    )
    device, is_main = accelerator.device, accelerator.is_main_process
    out_dir = Path(tc.out_dir)
    checkpoints_root = out_dir / "checkpoints"
    if is_main:
        require_writable_dir(out_dir, "out_dir")
        clean_unfinished(checkpoints_root)  # staging folders of a crash: never resumed from
    accelerator.wait_for_everyone()

    # Where to start. A checkpoint's model config wins, so a resume rebuilds the same shapes.
    resume_from = find_resume_point(tc.resume, checkpoints_root)
    model_cfg = cfg.model
    if resume_from is not None:
        model_cfg = ModelConfig.from_dict(read_trainer_state(resume_from)["model"])
        if model_cfg != cfg.model:
            accelerator.print(f"note: resuming {resume_from}: model settings come from it")
    cfg = Config(model=model_cfg, data=dc, train=tc)

    data_dir, files = prepare_images(accelerator, dc, model_cfg.resolution, out_dir)
    loader = ImageLoader(
        files, resolution=model_cfg.resolution, batch_size=tc.batch_size,
        shard_id=accelerator.process_index,  # the global rank
        num_shards=accelerator.num_processes, seed=tc.seed, crop_box=dc.crop_box, flip=dc.flip,
        num_threads=dc.num_threads, device_id=device.index if device.type == "cuda" else None,
        decoded_cache=dc.decoded_cache,
    )  # fmt: skip
    if dc.decoded_cache == "auto":
        build_start = time.perf_counter()
        cache = loader.build_cache()
        megabytes = loader.cache_bytes / 2**20
        accelerator.print(
            f"decoded-image cache: {len(files)} images, {megabytes:.0f} MiB in {cache.device} "
            f"memory, decoded in {time.perf_counter() - build_start:.1f} s"
            if cache is not None
            else f"streaming images from files: decoded they would take {megabytes:.0f} MiB, more "
            "than a quarter of the free memory"
        )
    global_batch = tc.batch_size * accelerator.num_processes
    total_steps = tc.max_steps or tc.epochs * loader.steps_per_epoch
    extractor, real_stats = prepare_fid(accelerator, tc, dc, files, model_cfg.resolution,
                                        loader.device_id)  # fmt: skip

    gan = build_gan(accelerator, model_cfg, tc)
    opt_g, opt_d, ema, generator_core = gan.opt_g, gan.opt_d, gan.ema, gan.generator_core
    fixed_z = torch.randn(
        tc.num_samples, model_cfg.z_dim, generator=torch.Generator().manual_seed(tc.seed)
    ).to(device)

    def set_learning_rates(scale: float) -> None:
        for optimizer, base in ((opt_g, tc.lr_g), (opt_d, tc.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = base * scale

    def restore(path: Path) -> dict:
        state = load_checkpoint(accelerator, path, ema)  # RNG states included
        set_learning_rates(state.get("lr_scale", 1.0))
        return state

    step, images_seen, wall_before, lr_scale = 0, 0, 0.0, 1.0
    best_fid, best_step = float("inf"), None
    if resume_from is not None:
        state = restore(resume_from)
        step, images_seen, wall_before = state["step"], state["images_seen"], state["wall_time"]
        best_fid, best_step = state.get("best_fid") or float("inf"), state.get("best_step")
        lr_scale = state.get("lr_scale", 1.0)
    else:
        set_seed(tc.seed + accelerator.process_index)  # each process draws its own z

    preempt_marker = Path(os.environ.get("DISTGAN_PREEMPT_MARKER") or out_dir / PREEMPTED_MARKER)
    if is_main:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        preempt_marker.unlink(missing_ok=True)
        cfg.save_toml(out_dir / "config.toml")
        print(
            f"distgan: {accelerator.num_processes} process(es) on {device.type}, batch "
            f"{tc.batch_size}/process (global {global_batch}), precision {mixed_precision}, "
            f"{len(files)} images in {data_dir}, {loader.steps_per_epoch} steps/epoch, "
            f"steps {step} -> {total_steps}, output {out_dir}",
            flush=True,
        )
    stop_request, stopped_by = catch_stop_signals(), None
    fault, nan_steps = injected_faults()
    # Non-finite steps, counted on the device and read at log steps: no extra host syncs.
    skipped, streak, worst_streak = (torch.zeros((), device=device) for _ in range(3))
    rollbacks = 0
    metrics_path = out_dir / "metrics.jsonl"
    progress = tqdm(total=total_steps, initial=step, unit="step", disable=not is_main)
    run_start = time.perf_counter()
    window_start, window_step, io_seconds = run_start, step, 0.0
    compile_pending = tc.compile

    try:
        while step < total_steps and stopped_by is None:
            epoch, start_in_epoch = divmod(step, loader.steps_per_epoch)
            for real in loader.epoch(epoch, start_in_epoch):
                if is_main and step == 0:
                    save_grid(real[: tc.num_samples].clone(), out_dir / "samples" / "real.png")
                poison = float("nan") if step + 1 in nan_steps else 1.0
                nan_steps.discard(step + 1)
                loss_d, loss_g, real_logits, fake_logits, bad_step = gan_step(
                    accelerator, tc, gan, real, step, poison
                )
                skipped += bad_step
                streak = (streak + bad_step) * bad_step
                worst_streak = torch.maximum(worst_streak, streak)

                step += 1
                images_seen += global_batch
                progress.update(1)
                if compile_pending:  # the first step compiles: time it, keep it out of images/s
                    loss_g.item()  # waits for the step to finish
                    compile_pending = False
                    seconds = time.perf_counter() - window_start
                    accelerator.print(f"torch.compile: first step (compiling) took {seconds:.1f} s")
                    window_start, window_step = time.perf_counter(), step
                last = step == total_steps
                if fault == (accelerator.process_index, step):
                    raise RuntimeError(f"injected fault at step {step} (DISTGAN_INJECT_FAULT)")
                # Processes may get the signal at different steps: agree on one step to stop at.
                if accelerator.num_processes == 1:
                    stopped_by = stop_request["signal"]
                elif step % STOP_CHECK_EVERY == 0 and not last:
                    flag = torch.tensor([float(stop_request["signal"] is not None)], device=device)
                    if accelerator.reduce(flag, "sum").item() > 0:
                        stopped_by = stop_request["signal"] or "a signal to another process"

                if step % tc.log_every == 0 or last:  # the only host syncs of the loop
                    stats = torch.stack([
                        loss_d.detach(), loss_g.detach(),
                        torch.sigmoid(real_logits.detach().float()).mean(),
                        torch.sigmoid(fake_logits.detach().float()).mean(),
                    ])  # fmt: skip
                    loss_d_mean, loss_g_mean, d_real, d_fake = accelerator.reduce(
                        stats, "mean"
                    ).tolist()
                    skipped_steps, longest = int(skipped.item()), int(worst_streak.item())
                    buffers_finite = finite_buffers(generator_core)
                    skipped.zero_()
                    worst_streak.copy_(streak)
                    now = time.perf_counter()
                    images_per_sec = (
                        (step - window_step) * global_batch / (now - window_start - io_seconds)
                    )
                    window_start, window_step, io_seconds = now, step, 0.0
                    if is_main:
                        append_jsonl(metrics_path, {
                            "step": step, "epoch": round(step / loader.steps_per_epoch, 4),
                            "images_seen": images_seen,
                            "loss_d": loss_d_mean, "loss_g": loss_g_mean,
                            "d_real": d_real, "d_fake": d_fake,
                            "images_per_sec": round(images_per_sec, 2),
                            "lr_g": opt_g.param_groups[0]["lr"],
                            "lr_d": opt_d.param_groups[0]["lr"],
                            "skipped_steps": skipped_steps,
                            "wall_time": round(wall_before + now - run_start, 2),
                        })  # fmt: skip
                        progress.set_postfix(
                            loss_d=f"{loss_d_mean:.3f}", loss_g=f"{loss_g_mean:.3f}",
                            img_s=f"{images_per_sec:.0f}",
                        )  # fmt: skip
                        if skipped_steps:
                            progress.write(f"step {step}: skipped {skipped_steps} step(s) with "
                                           "non-finite losses or gradients")  # fmt: skip
                    # Too many non-finite steps in a row (or G's BN statistics poisoned): go back to
                    # the last good checkpoint with lower learning rates, or stop, as configured.
                    why = divergence(longest, buffers_finite, step, tc.nonfinite_limit)
                    if why:
                        good = list_checkpoints(checkpoints_root)
                        if rollbacks == MAX_ROLLBACKS:
                            why += f", again after {MAX_ROLLBACKS} rollbacks"
                        if tc.on_nonfinite == "stop" or not good or rollbacks == MAX_ROLLBACKS:
                            kept = (
                                f"the last good checkpoint is {good[-1]}"
                                if good
                                else "no checkpoint yet"
                            )
                            raise RunStopped(
                                f"{why}; {kept}: lower --lr-g/--lr-d, or --on-nonfinite rollback"
                            )
                        lr_scale *= tc.rollback_lr_factor
                        rollbacks += 1
                        state = restore(good[-1])
                        set_learning_rates(lr_scale)
                        step, images_seen = state["step"], state["images_seen"]
                        progress.n, window_step = step, step
                        streak.zero_()
                        worst_streak.zero_()
                        if is_main:
                            event = {"step": step, "event": "rollback", "reason": why,
                                     "checkpoint": good[-1].name, "lr_scale": lr_scale}  # fmt: skip
                            append_jsonl(metrics_path, event)
                            progress.write(
                                f"{why}: rolled back to {good[-1].name}, "
                                f"learning rates x{lr_scale:g}"
                            )
                        break  # restart the data stream at the checkpoint's position

                io_start = time.perf_counter()
                if tc.eval_every and (step % tc.eval_every == 0 or last):
                    # One generator for all processes: main's BN statistics (weights are identical).
                    for buffer in ema.module.buffers():
                        buffer.copy_(broadcast(buffer.clone(), from_process=0))
                    eval_start = time.perf_counter()
                    fake_stats = metrics.fake_stats(
                        accelerator, extractor, ema.module, tc.eval_num, batch_size=tc.batch_size,
                        seed=tc.seed + 1, device=device,
                    )  # fmt: skip
                    result = metrics.scores(real_stats, fake_stats)
                    if result["fid"] < best_fid:
                        best_fid, best_step = result["fid"], step
                        if is_main:
                            save_generator(
                                out_dir / "best", ema.module, step=step, images_seen=images_seen
                            )
                    record = {
                        "step": step, **result, "best_fid": best_fid, "best_step": best_step,
                        **metrics.describe(extractor, real_stats, fake_stats, model_cfg.resolution),
                        "eval_seconds": round(time.perf_counter() - eval_start, 2),
                    }  # fmt: skip
                    if is_main:
                        append_jsonl(metrics_path, record)
                        progress.write(
                            f"step {step}: FID {result['fid']:.3f} KID {result['kid_mean']:.5f} "
                            f"(best FID {best_fid:.3f} at step {best_step}; {extractor.name}, "
                            f"{fake_stats.count} fake vs {real_stats.count} real)"
                        )
                if is_main and (step % tc.sample_every == 0 or last):
                    with torch.no_grad():
                        samples = ema.module(fixed_z)
                    save_grid(samples, out_dir / "samples" / f"step-{step:08d}.png")
                    plot_losses(metrics_path, out_dir / "losses.png")
                if (step % tc.ckpt_every == 0 or last or stopped_by) and not finite_buffers(
                    generator_core
                ):
                    progress.write(
                        f"step {step}: no checkpoint: G's BatchNorm statistics are not finite"
                    )
                elif step % tc.ckpt_every == 0 or last or stopped_by:
                    wall_time = wall_before + time.perf_counter() - run_start
                    save_checkpoint(accelerator, checkpoints_root, step, ema, {
                        "step": step, "images_seen": images_seen, "wall_time": round(wall_time, 2),
                        "global_batch": global_batch, "model": model_cfg.to_dict(),
                        "best_fid": best_fid if best_step else None, "best_step": best_step,
                        "lr_scale": lr_scale,
                    }, keep=tc.keep_checkpoints)  # fmt: skip
                io_seconds += time.perf_counter() - io_start
                if last or stopped_by:
                    break

    finally:
        progress.close()  # also on errors: the last line a user sees is the error
    if stopped_by:
        if is_main:  # launch/slurm/train.sbatch requeues the job when it finds this marker
            marker = {"step": step, "signal": stopped_by, "checkpoint": f"step-{step:08d}"}
            preempt_marker.write_text(json.dumps(marker))
            print(f"stopped by {stopped_by} at step {step}: checkpoint written; the same command "
                  "resumes from it", flush=True)  # fmt: skip
    else:
        check_ddp_consistency(accelerator, {"G": generator_core,
                                            "D": accelerator.unwrap_model(gan.discriminator),
                                            "EMA G": ema.module})  # fmt: skip
        if is_main:
            if accelerator.num_processes > 1:
                print(f"weights identical on all {accelerator.num_processes} processes "
                      "(G, D, EMA G)", flush=True)  # fmt: skip
            save_generator(out_dir, ema.module, step=step, images_seen=images_seen)
            print(f"done: step {step}, samples in {out_dir / 'samples'}, generator "
                  f"{out_dir / 'generator.safetensors'}", flush=True)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except Exception as err:
        # Name the process: under a launcher the first failure is the one that matters, and the
        # launcher then stops the other processes (or they time out of their next collective).
        rank = os.environ.get("RANK", "0")
        print(f"error: process {rank} failed: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)  # fmt: skip
        raise
