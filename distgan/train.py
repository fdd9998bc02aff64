"""The training loop: one function, top to bottom. Accelerate supplies the processes, DDP and
mixed precision; DALI the data; everything written to disk is written by the main process."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import broadcast, set_seed
from tqdm.auto import tqdm

from distgan import metrics
from distgan.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_generator,
)
from distgan.config import Config, parse_args
from distgan.data import ImageLoader, find_images
from distgan.ema import EMA
from distgan.errors import UserError
from distgan.faces import builtin_faces_dir, default_cache_dir, ensure_builtin_faces
from distgan.losses import d_loss, g_loss, gradient_penalty
from distgan.models import Discriminator, Generator, ModelConfig
from distgan.report import append_jsonl, plot_losses, save_grid

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_CHECK_EVERY = 10  # steps between the collective that agrees on stopping (several processes)
PREEMPTED_MARKER = "preempted.json"


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


def catch_stop_signals() -> dict:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, or the launcher
    stopping its workers) ask the loop to finish its step, checkpoint and exit."""
    received = {"signal": None}

    def remember(signum, _frame):
        received["signal"] = signal.Signals(signum).name

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, remember)
    return received


def injected_fault() -> tuple[int, int] | None:
    """(rank, step) from DISTGAN_INJECT_FAULT="RANK:STEP": that process raises at that step. For
    the tests of failure handling, which need one rank to fail mid-run."""
    value = os.environ.get("DISTGAN_INJECT_FAULT")
    if not value:
        return None
    rank, step = value.split(":")
    return int(rank), int(step)


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


def train(cfg: Config) -> Path:
    """Train G and D as `cfg` says; return the output folder. Works under `accelerate launch`
    with any number of processes and under plain `python`."""
    tc, dc = cfg.train, cfg.data
    mixed_precision = resolve_mixed_precision(tc.mixed_precision)
    # D runs three times per step (real, fake, fake for G) with BatchNorm: broadcasting buffers
    # on each forward would break autograd, so every process keeps its own BN statistics.
    # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which Accelerate's kwargs
    # handler cannot pass yet; its own text says to keep broadcast_buffers=False for local buffers.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    if tc.sync_bn and not torch.cuda.is_available():
        raise UserError(
            "sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernels): drop --sync-bn"
        )
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

    # Where to start. A checkpoint's model config wins, so a resume rebuilds the same shapes.
    resume_from = find_resume_point(tc.resume, checkpoints_root)
    model_cfg = cfg.model
    if resume_from is not None:
        model_cfg = ModelConfig.from_dict(read_trainer_state(resume_from)["model"])
        if model_cfg != cfg.model:
            accelerator.print(
                f"note: resuming {resume_from}: model settings come from it, {model_cfg}"
            )
    cfg = Config(model=model_cfg, data=dc, train=tc)

    # Data: the built-in faces are rendered once per machine, by its first process.
    data_dir = dc.data_dir
    if data_dir is None:
        render_size = max(128, model_cfg.resolution)
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
    loader = ImageLoader(
        files,
        resolution=model_cfg.resolution,
        batch_size=tc.batch_size,
        shard_id=accelerator.process_index,  # the global rank
        num_shards=accelerator.num_processes,
        seed=tc.seed,
        crop_box=dc.crop_box,
        flip=dc.flip,
        num_threads=dc.num_threads,
        device_id=device.index if device.type == "cuda" else None,
    )
    global_batch = tc.batch_size * accelerator.num_processes
    total_steps = tc.max_steps or tc.epochs * loader.steps_per_epoch

    # Models and optimizers: the same init on every process (DDP also broadcasts it).
    set_seed(tc.seed)
    generator, discriminator = Generator(model_cfg), Discriminator(model_cfg)
    if tc.sync_bn and accelerator.num_processes > 1:
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    ema = EMA(generator, tc.ema_decay)
    ema.module.to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr_g, betas=(tc.beta1, tc.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d, betas=(tc.beta1, tc.beta2))
    generator, discriminator, opt_g, opt_d = accelerator.prepare(
        generator, discriminator, opt_g, opt_d
    )
    generator_core = accelerator.unwrap_model(generator)
    fixed_z = torch.randn(
        tc.num_samples, model_cfg.z_dim, generator=torch.Generator().manual_seed(tc.seed)
    ).to(device)

    # FID/KID: the extractor and the real statistics first, so a missing weights file fails now.
    extractor = real_stats = None
    if tc.eval_every:
        extractor = metrics.make_extractor(tc.eval_features, tc.inception_weights, device)
        reference = metrics.real_files(files, tc.eval_real_num)
        key = metrics.real_stats_key(reference, model_cfg.resolution, dc.crop_box, len(reference),
                                     extractor.name)  # fmt: skip
        stats_path = Path(dc.cache_dir or default_cache_dir()) / "fid-stats" / f"{key}.npz"
        real_stats = metrics.load_stats(stats_path)
        have_all = torch.tensor([float(real_stats is not None)], device=device)
        if accelerator.reduce(have_all, "sum").item() < accelerator.num_processes:
            accelerator.print(f"computing real statistics of {len(reference)} images (once) ...")
            real_stats = metrics.real_stats(
                accelerator, extractor, reference, resolution=model_cfg.resolution,
                crop_box=dc.crop_box, batch_size=tc.batch_size, num_threads=dc.num_threads,
                device_id=loader.device_id,
            )  # fmt: skip
            if is_main:
                metrics.save_stats(stats_path, real_stats)

    step, images_seen, wall_before = 0, 0, 0.0
    best_fid, best_step = float("inf"), None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema)  # RNG states included
        step, images_seen, wall_before = state["step"], state["images_seen"], state["wall_time"]
        best_fid, best_step = state.get("best_fid") or float("inf"), state.get("best_step")
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
    stop_request, fault = catch_stop_signals(), injected_fault()
    stopped_by = None
    metrics_path = out_dir / "metrics.jsonl"
    progress = tqdm(total=total_steps, initial=step, unit="step", disable=not is_main)
    run_start = time.perf_counter()
    window_start, window_step, io_seconds = run_start, step, 0.0

    while step < total_steps and stopped_by is None:
        epoch, start_in_epoch = divmod(step, loader.steps_per_epoch)
        for real in loader.epoch(epoch, start_in_epoch):
            if is_main and step == 0:
                save_grid(real[: tc.num_samples].clone(), out_dir / "samples" / "real.png")
            z = torch.randn(real.shape[0], model_cfg.z_dim, device=device)
            fake = generator(z)

            # D step: real and fake losses summed, one backward. fake is detached: no G grads.
            discriminator.requires_grad_(True)
            real_logits = discriminator(real)
            fake_logits = discriminator(fake.detach())
            loss_d = d_loss(tc.loss, real_logits, fake_logits, tc.real_label)
            if tc.loss == "wgan-gp":
                penalty = gradient_penalty(discriminator, real, fake, accelerator.scaler)
                loss_d = loss_d + tc.gp_weight * penalty
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            opt_d.step()

            # G step: D is frozen, so it collects no gradients and DDP reduces none of D's.
            discriminator.requires_grad_(False)
            loss_g = g_loss(tc.loss, discriminator(fake))
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            opt_g.step()
            ema.update(generator_core, step)

            step += 1
            images_seen += global_batch
            progress.update(1)
            last = step == total_steps
            if fault == (accelerator.process_index, step):
                raise RuntimeError(f"injected fault at step {step} (DISTGAN_INJECT_FAULT)")
            # Processes may get the signal at different steps: agree, so all stop at the same one.
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
                now = time.perf_counter()
                images_per_sec = (
                    (step - window_step) * global_batch / (now - window_start - io_seconds)
                )
                window_start, window_step, io_seconds = now, step, 0.0
                if is_main:
                    append_jsonl(metrics_path, {
                        "step": step, "epoch": round(step / loader.steps_per_epoch, 4),
                        "images_seen": images_seen, "loss_d": loss_d_mean, "loss_g": loss_g_mean,
                        "d_real": d_real, "d_fake": d_fake,
                        "images_per_sec": round(images_per_sec, 2),
                        "lr_g": opt_g.param_groups[0]["lr"], "lr_d": opt_d.param_groups[0]["lr"],
                        "wall_time": round(wall_before + now - run_start, 2),
                    })  # fmt: skip
                    progress.set_postfix(
                        loss_d=f"{loss_d_mean:.3f}", loss_g=f"{loss_g_mean:.3f}",
                        img_s=f"{images_per_sec:.0f}",
                    )  # fmt: skip

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
                        save_generator(out_dir / "best", ema.module, step=step,
                                       images_seen=images_seen)  # fmt: skip
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
            if step % tc.ckpt_every == 0 or last or stopped_by:
                wall_time = wall_before + time.perf_counter() - run_start
                save_checkpoint(accelerator, checkpoints_root, step, ema, {
                    "step": step, "images_seen": images_seen, "wall_time": round(wall_time, 2),
                    "global_batch": global_batch, "model": model_cfg.to_dict(),
                    "best_fid": best_fid if best_step else None, "best_step": best_step,
                }, keep=tc.keep_checkpoints)  # fmt: skip
            io_seconds += time.perf_counter() - io_start
            if last or stopped_by:
                break

    progress.close()
    if stopped_by:
        if is_main:  # launch/slurm/train.sbatch requeues the job when it finds this marker
            marker = {"step": step, "signal": stopped_by, "checkpoint": f"step-{step:08d}"}
            preempt_marker.write_text(json.dumps(marker))
            print(f"stopped by {stopped_by} at step {step}: checkpoint written; the same command "
                  "resumes from it", flush=True)  # fmt: skip
    else:
        check_ddp_consistency(accelerator, {"G": generator_core, "D": discriminator,
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
    except Exception as err:
        # Name the process: under a launcher the first failure is the one that matters, and the
        # launcher then stops the other processes (or they time out of their next collective).
        rank = os.environ.get("RANK", "0")
        print(
            f"error: process {rank} failed: {type(err).__name__}: {err}",
            file=sys.stderr,
            flush=True,
        )
        raise
