"""The trainer end to end, run as a user runs it (`python launch/train.py`; several processes are
in test_distributed.py): the files a run writes, resume equal to an uninterrupted run, bf16
autocast on CPU, every loss, and clear errors for bad input; the precision `auto` picks on each
kind of GPU, and the deterministic-kernels switch; resuming with changed flags; a progress bar
that writes a few lines, not hundreds, to a log file; the course's settings (28-256 px at any
base * 2^k, grayscale, uniform z, Xavier init) from training through export, generate and
evaluate, and grayscale chosen by itself for a folder of gray images (the start-up line saying
what augment=auto chose for its size); a folder of JPEG, WebP, BMP
and PNG files (a 1x1 one too) trains on every image, counted by format; `--mixed-precision auto`
under `accelerate launch` follows the launcher's choice (flag or config file) and only that, and
the start-up line says who chose."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distgan.errors import UserError
from distgan.outputs.checkpoint import list_checkpoints, load_generator
from distgan.runtime.launch_env import LauncherPrecision
from distgan.training import precision as precision_module
from distgan.training.precision import (
    Precision,
    choose_precision,
    configure_kernels,
    native_precision,
    resolve_mixed_precision,
    resumed_precision,
)
from tests.helpers import (
    SMALL_GAN,
    assert_same_weights,
    image_array,
    run_module,
    run_train,
    small_run,
)

pytestmark = pytest.mark.slow


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_samples_metrics_checkpoints_and_generator(tmp_path, faces_cache):
    out = tmp_path / "run"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "30", "--keep-checkpoints", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "real.png",
        "step-00000010.png",
        "step-00000020.png",
        "step-00000030.png",
    ]
    grid = image_array(out / "samples" / "step-00000030.png")
    assert grid.shape[0] > 8 * 32 and grid.std() > 5  # 64 samples of 32 px, not blank
    records = metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for key in (
        "epoch",
        "images_seen",
        "loss_d",
        "loss_g",
        "d_real",
        "d_fake",
        "images_per_sec",
        "lr_g",
        "lr_d",
        "wall_time",
    ):
        assert key in records[-1], key
    assert records[-1]["images_seen"] == 30 * 8 and records[-1]["images_per_sec"] > 0
    assert (out / "losses.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step-00000020",
        "step-00000030",
    ]
    assert "[train]" in (out / "config.toml").read_text()
    generator, meta = load_generator(out)
    assert meta["step"] == 30 and meta["resolution"] == 32
    images = generator(torch.randn(4, meta["z_dim"]))
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    assert "error" not in result.stderr.lower()


def test_resume_matches_an_uninterrupted_run(tmp_path, faces_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(*small_run(straight, faces_cache, "--max-steps", "20")).returncode == 0
    assert run_train(*small_run(resumed, faces_cache, "--max-steps", "10")).returncode == 0
    result = run_train(*small_run(resumed, faces_cache, "--max-steps", "20"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 10 -> 20" in result.stdout
    # Same data order, z, flips, optimizer and RNG state: bitwise the same weights.
    assert_same_weights(straight, resumed, 20)
    assert [r["loss_d"] for r in metrics(straight)] == [r["loss_d"] for r in metrics(resumed)]


def test_bf16_autocast_runs_on_cpu(tmp_path, faces_cache):
    from accelerate import Accelerator

    from distgan.models.dcgan import Discriminator, ModelConfig

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    discriminator = Discriminator(ModelConfig(resolution=32, d_channels=8))
    inner_dtypes = []
    discriminator.net[0].register_forward_hook(lambda m, i, out: inner_dtypes.append(out.dtype))
    prepared = accelerator.prepare(discriminator)
    assert prepared(torch.randn(2, 3, 32, 32)).dtype == torch.float32  # cast back for the loss
    assert inner_dtypes == [torch.bfloat16]  # but the convolutions ran under bf16 autocast
    out = tmp_path / "bf16"
    result = run_train(
        *small_run(out, faces_cache, "--max-steps", "10", "--mixed-precision", "bf16")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision bf16" in result.stdout
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in metrics(out))


@pytest.mark.parametrize("loss", ["hinge", "wgan-gp"])
def test_other_losses_train(tmp_path, faces_cache, loss):
    out = tmp_path / loss
    result = run_train(
        *small_run(
            out,
            faces_cache,
            "--max-steps",
            "10",
            "--loss",
            loss,
            "--d-spectral-norm",
            "--d-dropout",
            "0.1",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    assert len(records) == 2 and all(abs(r["loss_d"]) < 1e4 for r in records)


def test_bad_input_fails_early_with_one_line(tmp_path, faces_cache):
    missing = run_train("--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "x")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: data_dir")
    assert "does not exist" in missing.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
    fp16 = run_train("--mixed-precision", "fp16", "--out-dir", tmp_path / "y")
    assert fp16.returncode == 2 and "fp16 needs a CUDA GPU" in fp16.stderr

    out = tmp_path / "done"
    assert run_train(*small_run(out, faces_cache, "--max-steps", "10")).returncode == 0
    again = run_train(*small_run(out, faces_cache, "--max-steps", "10", "--resume", "none"))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    bad = run_train(*small_run(out, faces_cache, "--resume", tmp_path / "nope"))
    assert bad.returncode == 2 and "not a complete distgan checkpoint" in bad.stderr


def test_decoded_cache_and_streaming_train_the_same_weights(tmp_path, faces_cache):
    cached, streamed = tmp_path / "cached", tmp_path / "streamed"
    two_epochs = ("--max-steps", "10", "--batch-size", "32")  # 8 steps an epoch: the cache pays
    result = run_train(*small_run(cached, faces_cache, *two_epochs))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoded-image cache: 240 images" in result.stdout
    streaming = (*two_epochs, "--decoded-cache", "off")
    result = run_train(*small_run(streamed, faces_cache, *streaming))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoded-image cache" not in result.stdout
    a, b = (
        load_file(cached / "generator.safetensors"),
        load_file(streamed / "generator.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layouts_and_compile_train(tmp_path, faces_cache):
    out = tmp_path / "classic"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "10", "--no-channels-last"))
    assert result.returncode == 0, result.stderr[-3000:]
    classic = metrics(out)
    out = tmp_path / "compiled"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "10", "--compile"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile: first step (compiling) took" in result.stdout
    compiled = metrics(out)
    assert [r["step"] for r in compiled] == [r["step"] for r in classic] == [5, 10]
    for a, b in zip(classic, compiled, strict=True):  # the same training, up to rounding
        assert abs(a["loss_d"] - b["loss_d"]) < 0.1 * abs(a["loss_d"]) + 0.05
    generator, _ = load_generator(out)
    assert all(torch.isfinite(p).all() for p in generator.state_dict().values())


@pytest.mark.parametrize(
    "native_bf16, capability, expected",
    [
        (True, (9, 0), "bf16"),
        (False, (7, 0), "fp16"),
        (False, (7, 5), "fp16"),
        (False, (6, 1), "no"),
    ],
)
def test_auto_precision_on_each_kind_of_gpu(monkeypatch, native_bf16, capability, expected):
    # H100/A100: bf16; V100/T4 emulate bf16 slowly, so fp16 with loss scaling; P100: fp32.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or including_emulation,
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_mixed_precision("auto") == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto") == "fp16"  # the launcher's explicit choice


def test_deterministic_kernels_switch(monkeypatch):
    # configure_kernels sets it when unset; this makes the test put the environment back.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        configure_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        configure_kernels(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def tiny_gan():
    """A CPU fp32 GAN as the trainer builds it, and one batch of real images."""
    from bench.training import fresh_accelerator
    from distgan.config.sections import TrainConfig
    from distgan.models.dcgan import ModelConfig
    from distgan.training.gan import build_gan

    accelerator = fresh_accelerator("no", torch.device("cpu"))
    tc = TrainConfig(batch_size=4, channels_last=False)
    model = ModelConfig(resolution=32, g_channels=8, d_channels=8)
    gan = build_gan(accelerator, model, tc, images=4)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    return accelerator, tc, gan, real


def snapshot(*tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def unchanged(now, before) -> list[bool]:
    """Per tensor: bitwise equal to its snapshot."""
    now = list(now)
    assert len(now) == len(before)
    return [torch.equal(a, b) for a, b in zip(now, before, strict=True)]


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()]


def test_a_nonfinite_step_changes_no_weight_and_no_optimizer_state():
    from distgan.training.gan import gan_step

    accelerator, tc, gan, real = tiny_gan()
    gan_step(accelerator, tc, gan, real, step=0)  # Adam's moments exist from here on
    weights = [*gan.generator.parameters(), *gan.discriminator.parameters()]
    before = snapshot(*weights, *optimizer_tensors(gan.opt_g), *optimizer_tensors(gan.opt_d))
    out = gan_step(accelerator, tc, gan, real, step=1, poison=float("nan"))
    assert out.skipped.item() == 1.0 and not torch.isfinite(out.loss_d)
    after = [*weights, *optimizer_tensors(gan.opt_g), *optimizer_tensors(gan.opt_d)]
    assert all(unchanged(after, before))
    assert gan_step(accelerator, tc, gan, real, step=2).skipped.item() == 0.0
    assert not all(unchanged(weights, before[: len(weights)]))  # a good step moves them


def test_d_collects_gradients_only_in_its_own_step_and_the_ema_moves():
    from distgan.training.gan import gan_step

    accelerator, tc, gan, real = tiny_gan()
    accumulated = []
    for param in gan.discriminator.parameters():
        param.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    ema_before = snapshot(*gan.ema.module.parameters())
    gan_step(accelerator, tc, gan, real, step=0)
    # One backward of D's loss fills each parameter once; the G step, with D frozen, adds none.
    assert len(accumulated) == len(list(gan.discriminator.parameters()))
    assert not all(unchanged(gan.ema.module.parameters(), ema_before))  # it moved
    live = list(gan.generator_core.parameters())
    assert not all(unchanged(gan.ema.module.parameters(), live))  # towards G, not onto it


def test_resuming_with_changed_flags_prints_applies_records_or_refuses(tmp_path, faces_cache):
    out = tmp_path / "run"
    assert run_train(*small_run(out, faces_cache, "--max-steps", "10")).returncode == 0
    refused = run_train(*small_run(out, faces_cache, "--max-steps", "20", "--resolution", "64"))
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "resolution 32 -> 64" in line and "new --out-dir" in line
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step-00000010"
    applied = run_train(*small_run(out, faces_cache, "--max-steps", "20", "--lr-g", "1e-4"))
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert "resuming with lr_g 0.0002 -> 0.0001 (recorded in config.toml)" in applied.stdout
    assert "steps 10 -> 20" in applied.stdout
    assert "lr_g = 0.0001" in (out / "config.toml").read_text()
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 10, "changes": {"lr_g": [0.0002, 0.0001], "max_steps": [10, 20]}}]
    assert metrics(out)[-1]["lr_g"] == 1e-4


def test_progress_to_a_file_is_a_few_lines_not_one_per_refresh(tmp_path, faces_cache):
    # stderr is a pipe here, as under SLURM: the bar updates at most once a minute (+ the end).
    result = run_train(*small_run(tmp_path / "run", faces_cache, "--max-steps", "60"))
    assert result.returncode == 0, result.stderr[-3000:]
    updates = [line for line in result.stderr.replace("\r", "\n").splitlines() if "step" in line]
    assert 1 <= len(updates) <= 3, updates
    assert "60/60" in updates[-1]


COURSE_SETTINGS = {
    "112px": ["--resolution", "112"],
    "28px-gray": ["--resolution", "28", "--channels", "1"],
    "uniform-z-xavier": ["--z-distribution", "uniform", "--init", "xavier"],
}


@pytest.mark.parametrize("flags", COURSE_SETTINGS.values(), ids=COURSE_SETTINGS)
def test_course_settings_train_export_generate_and_evaluate(tmp_path, faces_cache, flags):
    out, model, faces = tmp_path / "run", tmp_path / "g.onnx", tmp_path / "faces"
    tiny = ["--g-channels", "8", "--d-channels", "8", "--max-steps", "3", "--num-samples", "4"]
    result = run_train(*small_run(out, faces_cache, *tiny, *flags, sample_every=3))
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_generator(out)[0].config
    side, gray = config.resolution, config.channels == 1
    expected = {"112": (112, False), "28": (28, True)}.get(flags[1], (32, False))
    assert (side, gray) == expected
    mode = "L" if gray else "RGB"  # what a user sees: gray samples and faces for a gray model
    for grid in ("real.png", "step-00000003.png"):
        assert Image.open(out / "samples" / grid).mode == mode
    meta = json.loads((out / "generator.json").read_text())
    assert meta["z_distribution"] == config.z_distribution and meta["channels"] == config.channels

    exported = run_module("export", "onnx", "--run", out, "--out", model, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    onnx_meta = {p.key: p.value for p in onnx.load(model).metadata_props}
    assert onnx_meta["channels"] == str(config.channels)
    assert onnx_meta["z_distribution"] == config.z_distribution
    made = run_module(
        "export", "generate", "--model", model, "--num", "3", "--out-dir", faces, timeout=300
    )
    assert made.returncode == 0, made.stderr[-3000:]
    pngs = sorted(faces.glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == mode and image.size == (side, side)

    common = ["--features", "pixels", "--num", "16", "--batch-size", "8"]
    scored = run_module(
        "distgan.metrics.evaluate",
        "--onnx",
        model,
        *common,
        "--cache-dir",
        faces_cache,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    numbers = json.loads(scored.stdout)
    assert numbers["channels"] == config.channels and numbers["resolution"] == side
    assert numbers["fid"] == pytest.approx(numbers["torch_fid"], rel=0.01)  # same z both sides


def test_a_folder_of_gray_images_trains_and_resumes_a_gray_model_by_itself(tmp_path):
    folder, out = tmp_path / "gray", tmp_path / "run"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
    flags = ["--data-dir", folder, "--out-dir", out, *SMALL_GAN, "--g-channels", "8"]
    flags += ["--augment", "auto", "--augment-auto-max", "15"]
    result = run_train(*flags, "--resolution", "28", "--max-steps", "2", "--num-samples", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(as grayscale), flips off," in result.stdout  # a mirrored glyph is another glyph
    assert "augment none (auto: diffaugment up to 15 images)," in result.stdout  # 16 here
    generator, meta = load_generator(out)
    assert meta["channels"] == 1 and generator(torch.zeros(2, 100)).shape == (2, 1, 28, 28)
    assert Image.open(out / "samples" / "real.png").mode == "L"
    refused = run_train(*flags, "--resolution", "28", "--max-steps", "4", "--channels", "3")
    assert refused.returncode == 2 and "channels 'auto' -> '3'" in refused.stderr
    resumed = run_train(*flags, "--resolution", "28", "--max-steps", "4", "--num-samples", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_generator(out)[1]["step"] == 4 and load_generator(out)[1]["channels"] == 1


def test_a_folder_of_mixed_formats_trains_on_every_image(tmp_path):
    # Issue 14: 12 JPEGs, 4 WebP, 4 BMP, a grayscale PNG and a 1x1 JPEG, and two other files.
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, extension in enumerate([".jpg"] * 12 + [".webp"] * 4 + [".bmp"] * 4):
        colour = (index * 12, 255 - index * 12, 128)
        Image.new("RGB", (40, 30), colour).save(folder / f"{index:02d}{extension}")
    Image.new("L", (40, 30), 128).save(folder / "gray.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "pixel.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "thumbs.db").write_bytes(b"\0" * 16)
    out = tmp_path / "run"
    flags = ["--data-dir", folder, "--out-dir", out, "--cache-dir", tmp_path / "cache"]
    result = run_train(*flags, *SMALL_GAN, "--max-steps", "4", "--log-every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"data: 22 images (13 JPEG, 4 WebP, 4 BMP, 1 PNG) in {folder}; skipped 2 files without "
        "an image extension: notes.txt, thumbs.db"
    ) in result.stdout
    started = f"22 images in {folder}, flips on, 3 steps/epoch, augment diffaugment,"
    assert started in result.stdout  # 22 / 8 per batch; the default augmentation
    assert "decoded-image cache: 22 images" in result.stdout
    assert metrics(out)[-1]["images_seen"] == 32
    assert image_array(out / "samples" / "real.png").std() > 5


def test_the_start_up_line_says_who_chose_the_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    default = LauncherPrecision(None, "accelerate launch's default no")
    over_default = "auto: native here, over accelerate launch's default no; "
    assert choose_precision("auto", default) == (
        "bf16",
        over_default + "--mixed-precision no for fp32",
    )
    plain = LauncherPrecision(None, "")  # python launch/train.py
    assert choose_precision("auto", plain) == (
        "bf16",
        "auto: native here; --mixed-precision no for fp32",
    )
    chosen = LauncherPrecision("no", "accelerate launch --mixed_precision no")
    assert choose_precision("auto", chosen) == (
        "no",
        "auto: accelerate launch --mixed_precision no",
    )
    overruled = "--mixed-precision, over accelerate launch --mixed_precision no"
    assert choose_precision("bf16", chosen) == ("bf16", overruled)
    assert choose_precision("no", chosen) == ("no", "--mixed-precision")
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert choose_precision("auto", default) == ("no", "auto: no native bf16 or fp16 here")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        choose_precision("auto", LauncherPrecision("fp16", "ACCELERATE_MIXED_PRECISION=fp16"))


def test_auto_resumes_in_the_checkpoints_precision():
    # A bf16 run requeued under a launcher line that now reads as fp32 goes on in bf16.
    chosen = Precision("no", "auto: accelerate launch --mixed_precision no")
    assert resumed_precision(chosen, "bf16") == (
        "bf16",
        "auto: the checkpoint's; auto would pick no now",
    )
    assert resumed_precision(chosen, "no") is chosen


def trained_precision(out) -> str:
    """The precision a run trained in, as its last checkpoint records it."""
    state = list_checkpoints(out / "checkpoints")[-1] / "trainer_state.json"
    return json.loads(state.read_text())["precision"]


@pytest.mark.parametrize("choice", ["flag", "config file", "none"])
def test_auto_precision_follows_the_launchers_choice_and_only_that(tmp_path, faces_cache, choice):
    # A fresh HF_HOME: the user's own `accelerate config` cannot interfere.
    hf_home = tmp_path / "hf"
    config = hf_home / "accelerate" / "default_config.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--dynamo_backend", "no"]
    if choice == "flag":
        launcher += ["--mixed_precision", "no"]
    if choice == "config file":  # as `accelerate config` writes it
        config.parent.mkdir(parents=True)
        config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n"
            "num_processes: 1\n"
        )
    out = tmp_path / "run"
    env = {"HF_HOME": str(hf_home)}
    result = run_train(*small_run(out, faces_cache, "--max-steps", "2"), launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'mixed_precision = "auto"' in (out / "config.toml").read_text()
    expected = {
        "flag": "precision no (auto: accelerate launch --mixed_precision no)",
        "config file": f"precision no (auto: mixed_precision 'no' in {config})",
        # Nothing chosen: Accelerate's `no` is only its default. bf16 on this CPU (AVX-512 BF16).
        "none": f"precision {native_precision()} (auto: native here, over accelerate launch's "
        "default no; --mixed-precision no for fp32)",
    }[choice]
    if choice == "none" and native_precision() == "no":
        expected = "precision no (auto: no native bf16 or fp16 here)"
    assert expected in result.stdout, result.stdout[-2000:]
    assert trained_precision(out) == ("no" if choice != "none" else native_precision())
