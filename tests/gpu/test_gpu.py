"""The GPU paths of one GPU, end to end through the real entry points (`python launch/train.py`,
`accelerate launch`, `python -m export`, `python -m distgan.metrics.evaluate`), as the CPU suite runs them:

- training on cuda, streaming from the files (DALI GPU decode) and from the decoded-image cache
  in GPU memory, centred and with a crop box, RGB and gray (`--channels 1`), and the two data
  paths giving the same batches (bitwise: the GPU decoder keeps off the hardware JPEG engine);
  every other format through the GPU decoder as on the CPU;
- one process under `accelerate launch --num_processes 1` (Accelerate's device is then `cuda`
  without an index), and DALI's batches of a one-process GPU run really being on the GPU;
- fp16 with loss scaling and its resume (the scaler's state in the checkpoint), wgan-gp under
  bf16 and fp16, D's spectral norm under autocast, ADA (grid_sample on CUDA), torch.compile alone
  and around DDP, --sync-bn, a SIGUSR1 stop and its resume, and bitwise repeatable runs with
  --deterministic;
- ONNX export (fp32, fp16, uint8) and generation with onnxruntime's CUDA provider (IO binding),
  which loads in a process without torch; standalone evaluation of an exported model on the
  CUDA provider, and FID with the real Inception weights.

Every test is skipped, with the reason, where torch sees no CUDA GPU, and in a run that holds
CPU tests too (tests/conftest.py hides CUDA there); the ONNX generation tests also skip where
onnxruntime's CUDA provider cannot run without torch (test_the_cuda_provider_loads_without_torch
fails then), and the Inception test where the weights file is not on the machine. Run it on a
GPU machine with `python -m pytest -m gpu -rs`; the runs are tiny (32 px, 16 channels, batch 8,
10-20 steps), a few minutes in all. With two GPUs, --compile and --sync-bn run on two processes.

What one GPU cannot show. The 8-GPU and multi-node paths also rely on:
- NCCL all-reduce of the gradients across GPUs (DDP), and the other collectives (the stop-signal
  agreement, the weight-consistency check, the gathers of FID/KID) over NCCL;
- several processes, each with its own device (cuda:LOCAL_RANK) and DALI decoding on it, with
  DALI shard_id = the global rank, so that the shards are disjoint and cover the data;
- SyncBatchNorm across processes (--sync-bn, CUDA only; one GPU runs the flag on one process);
- the multi-node rendezvous (main address and port, machine ranks, c10d) under
  `accelerate launch` and launch/slurm/train.sbatch.
The CPU suite runs the gloo versions of those with 2 real processes (tests/integration/test_distributed.py:
identical weights, disjoint DALI shards, two "machines" on loopback, resume, SIGUSR1, a failing
process; tests/metrics/test_metrics.py: two processes give the one-process FID); NCCL, SyncBatchNorm and
several GPUs need a multi-GPU machine.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distgan.data.faces import ensure_builtin_faces
from distgan.data.folder import IMAGE_EXTENSIONS, find_images
from distgan.data.loader import ImageLoader
from distgan.metrics import features as extractors
from distgan.outputs.checkpoint import load_generator
from distgan.runtime.ort_cuda import problem_without_torch
from tests.helpers import (
    REPO,
    cuda_hidden_by_this_run,
    free_port,
    image_array,
    run_train,
    small_run,
    write_images,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        cuda_hidden_by_this_run(),
        reason="CUDA is hidden from a run that holds CPU tests too (tests/conftest.py): "
        "run the GPU suite alone, python -m pytest -m gpu",
    ),
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch.cuda.is_available() is False here",
    ),
]

# 10 steps of batch 32 (8 steps an epoch) read images twice: a run the decoded cache is built for
# (a run within one epoch streams).
TWO_EPOCHS = ("--max-steps", "10", "--batch-size", "32")
CACHE_LINE = re.compile(r"decoded-image cache: 240 images, \d+ MiB in cuda(:\d+)? memory")
ON_CUDA = "distgan: 1 process(es) on cuda, batch 8/process (global 8)"
ON_CUDA_32 = ON_CUDA.replace("batch 8/process (global 8)", "batch 32/process (global 32)")
CROP_BOX = ["24", "32", "80", "80"]  # inside the 128 px built-in faces


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_finite_run(out_dir: Path, steps: list[int]) -> None:
    """The run logged `steps` with finite losses and wrote a finite generator."""
    logged = records(out_dir)
    assert [r["step"] for r in logged] == steps
    for record in logged:
        assert math.isfinite(record["loss_d"]) and math.isfinite(record["loss_g"]), record
    generator, meta = load_generator(out_dir)
    assert meta["step"] == steps[-1]
    assert all(
        torch.isfinite(t).all() for t in generator.state_dict().values() if t.is_floating_point()
    )


def accelerate_launch(processes: int = 1) -> list[str]:
    """`accelerate launch` without --multi_gpu: one process (the module form, so no console
    script is needed on PYTHONPATH-based installs)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--num_processes", str(processes), "--num_machines", "1"]
    return command + ["--mixed_precision", "no", "--dynamo_backend", "no"]


def train(out, faces_cache, *flags, launcher=None, **small):
    """A small run (conftest's flags, `flags` on top) as a user starts it."""
    return run_train(*small_run(out, faces_cache, *flags, **small), launcher=launcher, timeout=300)


def python_module(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, faces_cache):
    """One short run from the GPU cache (the defaults): (its folder, its CompletedProcess)."""
    out = tmp_path_factory.mktemp("gpu-run") / "run"
    result = train(out, faces_cache, *TWO_EPOCHS, "--decoded-cache", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# --- training on one GPU ---------------------------------------------------------------------


def test_cached_run_trains_on_cuda_from_gpu_memory(trained_run):
    out, result = trained_run
    assert ON_CUDA_32 in result.stdout, result.stdout[-2000:]
    assert CACHE_LINE.search(result.stdout), result.stdout[-2000:]
    assert "done: step 10" in result.stdout
    assert_finite_run(out, [5, 10])
    assert (out / "checkpoints" / "step-00000010" / "trainer_state.json").is_file()


def test_streaming_gives_the_cached_batches_centred(tmp_path, faces_cache, trained_run):
    cached, _ = trained_run
    streamed = tmp_path / "streamed"
    result = train(streamed, faces_cache, *TWO_EPOCHS, "--decoded-cache", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA_32 in result.stdout and "decoded-image cache" not in result.stdout
    assert_finite_run(streamed, [5, 10])
    # The same first batch (order, flips, decode, resize, normalisation) either way. Training
    # itself is not bitwise on a GPU without --deterministic: cuDNN's backward is not.
    a, b = (
        image_array(cached / "samples" / "real.png"),
        image_array(streamed / "samples" / "real.png"),
    )
    assert a.shape == b.shape and a.std() > 5
    assert np.array_equal(a, b), f"real.png differs in {(a != b).any(-1).sum()} pixels"


def test_crop_box_streaming_and_cached_give_the_same_batches(tmp_path, faces_cache):
    grids = {}
    for mode in ("off", "auto"):
        out = tmp_path / mode
        flags = (*TWO_EPOCHS, "--decoded-cache", mode, "--crop-box", *CROP_BOX)
        result = train(out, faces_cache, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ON_CUDA_32 in result.stdout
        assert bool(CACHE_LINE.search(result.stdout)) == (mode == "auto"), result.stdout[-2000:]
        saved = tomllib.loads((out / "config.toml").read_text())
        assert saved["data"]["crop_box"] == [24, 32, 80, 80]
        assert_finite_run(out, [5, 10])
        grids[mode] = image_array(out / "samples" / "real.png")
    assert grids["off"].std() > 5 and np.array_equal(grids["off"], grids["auto"])


def test_one_process_under_accelerate_launch_uses_the_gpu(tmp_path, faces_cache):
    out = tmp_path / "accelerate"
    result = train(out, faces_cache, *TWO_EPOCHS, launcher=accelerate_launch(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA_32 in result.stdout, result.stdout[-2000:]
    # Accelerate's device is `cuda` with no index: DALI and the cache must still be on the GPU.
    assert CACHE_LINE.search(result.stdout), result.stdout[-2000:]
    assert result.stdout.count("done: step 10") == 1
    assert_finite_run(out, [5, 10])


def test_dali_batches_of_a_one_process_gpu_run_are_on_the_gpu(tmp_path):
    from distgan.data.folder import find_images
    from distgan.data.loader import ImageLoader, dali_device_id

    assert dali_device_id(torch.device("cuda")) == torch.cuda.current_device()
    assert dali_device_id(torch.device("cuda:0")) == 0
    assert dali_device_id(torch.device("cpu")) is None
    write_images(tmp_path / "images", 16)
    files = find_images(tmp_path / "images")
    batches = {}
    for mode in ("off", "auto"):
        device_id = dali_device_id(torch.device("cuda"))
        shard = {"shard_id": 0, "num_shards": 1, "seed": 0}
        loader = ImageLoader(
            files, resolution=32, batch_size=4, device_id=device_id, decoded_cache=mode, **shard
        )
        if mode == "auto":
            cache = loader.build_cache()
            assert (
                cache is not None and cache.device.type == "cuda" and cache.shape == (16, 32, 32, 3)
            )
        batches[mode] = [b.clone() for b in loader.epoch(0)]
        first = batches[mode][0]
        assert first.device.type == "cuda", (mode, first.device)
        assert first.shape == (4, 3, 32, 32) and first.dtype == torch.float32
        assert -1 <= first.min() < first.max() <= 1
    assert len(batches["off"]) == len(batches["auto"]) == 4
    for streamed, cached in zip(batches["off"], batches["auto"], strict=True):
        assert torch.allclose(streamed, cached, atol=1e-6, rtol=0)


def epoch_on_host(files, device_id, decoded_cache: str, **options) -> torch.Tensor:
    """Epoch 0 of a one-process loader (flips included), brought to the host."""
    shard = {"shard_id": 0, "num_shards": 1, "seed": 0}
    loader = ImageLoader(
        files, device_id=device_id, decoded_cache=decoded_cache, **shard, **options
    )
    return torch.cat([batch.cpu() for batch in loader.epoch(0)])


@pytest.mark.parametrize("channels", [3, 1], ids=["RGB", "GRAY"])
def test_faces_stream_and_cache_bitwise_alike_through_the_gpu_decoder(faces_cache, channels):
    """Issue 20, items 5 and 7: the built-in faces (colour JPEGs, chroma subsampled) decoded on
    the GPU to RGB and to GRAY, streamed and into the cache: bitwise the same batches, though
    most files sit at another batch position in each (the A100/H100 hardware JPEG engine, handed
    a share of each batch by position, would decode some of them a level apart); and near the
    CPU's decode (libjpeg-turbo upsamples chroma otherwise)."""
    files = find_images(ensure_builtin_faces(240, 128, faces_cache))
    options = {"resolution": 32, "batch_size": 32, "channels": channels}
    gpu = torch.cuda.current_device()
    streamed = epoch_on_host(files, gpu, "off", **options)
    cached = epoch_on_host(files, gpu, "auto", **options)
    assert streamed.shape[1:] == (channels, 32, 32) and streamed.shape == cached.shape
    differing = int((streamed != cached).flatten(1).any(1).sum())
    assert torch.equal(streamed, cached), f"{differing} of {len(streamed)} images differ"
    on_cpu = epoch_on_host(files, None, "off", **options)
    levels = ((streamed - on_cpu).abs() * 127.5).mean()
    assert levels < 3, f"the GPU decode is {levels:.2f} levels from the CPU's on average"


def test_other_formats_go_through_the_gpu_decoder_as_on_the_cpu(tmp_path):
    """Issue 20, item 5: every accepted format but JPEG, lossless, through the GPU pipeline
    (DALI's mixed decoder takes them, decoding on the CPU or GPU as it can): streamed and cached
    bitwise alike, and within a level of the CPU pipeline (the images are 24 px, decoded to 24)."""
    rng = np.random.default_rng(0)
    formats = [e for e in IMAGE_EXTENSIONS if e not in (".jpg", ".jpeg")]
    for index, extension in enumerate(formats):
        mode = {".pbm": "1", ".pgm": "L"}.get(extension, "RGB")
        image = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert(mode)
        image.save(
            tmp_path / f"{index:02d}{extension}",
            **({"lossless": True} if extension == ".webp" else {}),
        )
    files = find_images(tmp_path)
    assert len(files) == len(formats)
    options = {"resolution": 24, "batch_size": 4, "flip": False}
    gpu = torch.cuda.current_device()
    streamed = epoch_on_host(files, gpu, "off", **options)
    assert torch.equal(streamed, epoch_on_host(files, gpu, "auto", **options))
    on_cpu = epoch_on_host(files, None, "off", **options)
    levels = ((streamed - on_cpu).abs() * 127.5).amax(dim=(1, 2, 3))
    assert streamed.std() > 0.3 and levels.max() <= 1.001, levels


# --- precision, losses, compile ---------------------------------------------------------------


def test_fp16_checkpoint_holds_the_scaler_and_resumes(tmp_path, faces_cache):
    out = tmp_path / "fp16"
    first = train(out, faces_cache, "--max-steps", "10", "--mixed-precision", "fp16")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{ON_CUDA}, precision fp16" in first.stdout, first.stdout[-2000:]
    scaler = out / "checkpoints" / "step-00000010" / "scaler.pt"
    assert scaler.is_file()
    scale = torch.load(scaler, weights_only=True)["scale"]
    assert math.isfinite(scale) and scale > 0
    second = train(out, faces_cache, "--max-steps", "20", "--mixed-precision", "fp16")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "steps 10 -> 20" in second.stdout and "precision fp16" in second.stdout
    assert (out / "checkpoints" / "step-00000020" / "scaler.pt").is_file()
    assert_finite_run(out, [5, 10, 15, 20])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_wgan_gp_trains_under_mixed_precision(tmp_path, faces_cache, precision):
    out = tmp_path / f"wgan-gp-{precision}"
    flags = ("--max-steps", "10", "--loss", "wgan-gp", "--mixed-precision", precision)
    result = train(out, faces_cache, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{ON_CUDA}, precision {precision}" in result.stdout, result.stdout[-2000:]
    assert_finite_run(out, [5, 10])
    assert all(abs(r["loss_d"]) < 1e4 for r in records(out))


def test_compile_trains_on_cuda(tmp_path, faces_cache):
    out = tmp_path / "compiled"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "10", "--compile"), timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA in result.stdout
    assert "torch.compile: first step (compiling) took" in result.stdout
    assert_finite_run(out, [5, 10])


def ddp_launcher() -> tuple[list[str], int]:
    """A launcher under which Accelerate wraps G and D in DDP over NCCL, and its process count:
    two processes on two GPUs where there are two, else torchrun's one (its LOCAL_RANK makes
    Accelerate's MULTI_GPU: DDP of a single process)."""
    if torch.cuda.device_count() >= 2:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        command += ["--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]
        return [*command, "--main_process_port", str(free_port())], 2
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
    ], 1


def test_compile_with_ddp_trains_on_cuda(tmp_path, faces_cache):
    """Issue 20, item 5: torch.compile around DDP-wrapped G and D (the graph split at the
    gradient buckets), over NCCL."""
    launcher, processes = ddp_launcher()
    out = tmp_path / "compiled-ddp"
    flags = small_run(out, faces_cache, "--max-steps", "10", "--compile")
    result = run_train(*flags, launcher=launcher, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"distgan: {processes} process(es) on cuda" in result.stdout, result.stdout[-2000:]
    assert "torch.compile: first step (compiling) took" in result.stdout
    assert result.stdout.count("done: step 10") == 1
    assert_finite_run(out, [5, 10])


def test_sync_bn_trains_on_cuda(tmp_path, faces_cache):
    """Issue 20, item 5: --sync-bn on CUDA under DDP. With two GPUs, SyncBatchNorm gathers its
    statistics over NCCL; with one, the flag is accepted and BatchNorm stays plain (one process
    has nothing to sync)."""
    launcher, processes = ddp_launcher()
    out = tmp_path / "sync-bn"
    result = run_train(
        *small_run(out, faces_cache, "--max-steps", "10", "--sync-bn"),
        launcher=launcher,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"distgan: {processes} process(es) on cuda" in result.stdout, result.stdout[-2000:]
    assert tomllib.loads((out / "config.toml").read_text())["train"]["sync_bn"] is True
    assert_finite_run(out, [5, 10])


def test_ada_trains_on_cuda(tmp_path, faces_cache):
    """Issue 20, item 5: ADA's grid_sample and colour matrices, forward and backward, on CUDA,
    with p pushed up from the first window (target -0.9: D's mean sign on the reals is above)."""
    out = tmp_path / "ada"
    ada = ("--augment", "ada", "--ada-target", "-0.9", "--ada-kimg", "0.1")
    result = train(out, faces_cache, "--max-steps", "20", *ada)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA in result.stdout, result.stdout[-2000:]
    assert_finite_run(out, [5, 10, 15, 20])
    p = [record["aug_p"] for record in records(out)]
    assert p[-1] > 0, p


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_d_spectral_norm_trains_under_autocast(tmp_path, faces_cache, precision):
    """Issue 20, item 5: spectral normalisation of D's convolutions (its power iteration and
    weight division) under CUDA autocast."""
    out = tmp_path / f"spectral-{precision}"
    flags = ("--max-steps", "10", "--d-spectral-norm", "--mixed-precision", precision)
    result = train(out, faces_cache, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{ON_CUDA}, precision {precision}" in result.stdout, result.stdout[-2000:]
    assert_finite_run(out, [5, 10])


def test_gray_training_streams_and_caches_the_same_batches(tmp_path, faces_cache):
    """Issue 20, item 5: --channels 1 decodes the colour faces to GRAY on the GPU, streamed and
    into the cache alike."""
    grids = {}
    for mode in ("off", "auto"):
        out = tmp_path / mode
        flags = (*TWO_EPOCHS, "--channels", "1", "--decoded-cache", mode)
        result = train(out, faces_cache, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ON_CUDA_32 in result.stdout and "(as grayscale)" in result.stdout
        assert bool(CACHE_LINE.search(result.stdout)) == (mode == "auto"), result.stdout[-2000:]
        assert_finite_run(out, [5, 10])
        grids[mode] = image_array(out / "samples" / "real.png")
    assert grids["off"].std() > 5 and np.array_equal(grids["off"], grids["auto"])


def test_deterministic_runs_are_bitwise_identical(tmp_path, faces_cache):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        # --augment none: grid_sample's and the gathers' CUDA backward are not deterministic.
        flags = (
            *TWO_EPOCHS,
            "--deterministic",
            "--decoded-cache",
            "auto",
            "--augment",
            "none",
        )
        result = train(out, faces_cache, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ON_CUDA_32 in result.stdout and CACHE_LINE.search(result.stdout)
    for name in ("generator.safetensors", "checkpoints/step-00000010/model_1.safetensors"):
        a, b = load_file(outs[0] / name), load_file(outs[1] / name)
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{name}: {differing[:5]}"
    keys = ("step", "loss_d", "loss_g", "d_real", "d_fake")  # not the timings
    first, second = ([[r[k] for k in keys] for r in records(out)] for out in outs)
    assert first == second


# --- stop and resume --------------------------------------------------------------------------


def test_sigusr1_stops_with_a_checkpoint_and_resumes(tmp_path, faces_cache):
    out = tmp_path / "preempt"
    long_run = ("--max-steps", "200000", "--ckpt-every", "100000")
    args = small_run(out, faces_cache, *long_run, sample_every=100000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DISTGAN_PREEMPT_MARKER", None)
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        command = [sys.executable, str(REPO / "launch" / "train.py"), *map(str, args)]
        job = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=REPO, env=env)
        try:
            metrics_file = out / "metrics.jsonl"
            deadline = time.time() + 180
            while (
                time.time() < deadline
                and job.poll() is None
                and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 4)
            ):
                time.sleep(0.2)
            assert job.poll() is None, stderr_path.read_text()[-3000:]
            job.send_signal(signal.SIGUSR1)
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    output = stdout_path.read_text()
    assert job.returncode == 0, stderr_path.read_text()[-3000:]
    assert ON_CUDA in output
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGUSR1" and 20 <= step < 200000
    assert f"stopped by SIGUSR1 at step {step}" in output
    assert (out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()
    assert not (out / "generator.safetensors").exists()  # the run is not finished

    more = ("--max-steps", str(step + 10), "--ckpt-every", "100000")
    resumed = train(out, faces_cache, *more, sample_every=100000)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {step} -> {step + 10}" in resumed.stdout
    assert not (out / "preempted.json").exists()
    generator, meta = load_generator(out)
    assert meta["step"] == step + 10


# --- export, generation, evaluation -----------------------------------------------------------


def ort_cuda_build() -> None:
    """Skip where onnxruntime has no CUDA provider at all (onnxruntime rather than
    onnxruntime-gpu installed): nothing of ours could load it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (a CPU build)")


@pytest.fixture(scope="module")
def ort_cuda():
    """Skip where onnxruntime's CUDA provider cannot run without torch, as generate runs; that
    it can is test_the_cuda_provider_loads_without_torch's to show."""
    ort_cuda_build()
    problem = problem_without_torch()
    if problem:
        pytest.skip(problem)


def test_the_cuda_provider_loads_without_torch():
    """Issue 20, item 1: `python -m export generate` imports no torch, which otherwise loads
    pip's CUDA, cuBLAS and cuDNN: its own preload must let the provider load and convolve, and
    `python -m distgan.runtime.env` must say so from a process without torch."""
    ort_cuda_build()
    assert problem_without_torch() is None
    report = python_module("distgan.runtime.env")
    assert "a CUDA session without torch (python -m export generate) runs on the GPU" in (
        report.stdout
    ), report.stdout


@pytest.fixture(scope="module")
def onnx_models(trained_run, tmp_path_factory):
    """The trained run exported as fp32, fp16 and uint8 (each verified against PyTorch)."""
    run, _ = trained_run
    folder = tmp_path_factory.mktemp("onnx")
    models = {}
    for name, flags in {"fp32": [], "fp16": ["--fp16"], "uint8": ["--uint8"]}.items():
        models[name] = folder / f"g-{name}.onnx"
        result = python_module("export", "onnx", "--run", run, "--out", models[name], *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "batch  64: max abs error vs PyTorch" in result.stdout, result.stdout[-2000:]
        assert models[name].stat().st_size > 10_000
    return models


@pytest.mark.parametrize("precision", ["fp32", "fp16", "uint8"])
def test_export_and_generate_with_the_cuda_provider(onnx_models, ort_cuda, tmp_path, precision):
    from export.generate import Runner
    from export.runtime import create_session

    model = onnx_models[precision]
    session = create_session(model, "cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert Runner(session).on_cuda  # generate takes the IO binding path
    gpu, cpu = tmp_path / "cuda", tmp_path / "cpu"
    for device, folder in (("cuda", gpu), ("cpu", cpu)):
        sizes = ("--num", 64, "--batch-size", 32, "--seed", 3)
        result = python_module(
            "export", "generate", "--model", model, "--device", device, "--out-dir", folder, *sizes
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"onnxruntime: {'CUDA' if device == 'cuda' else 'CPU'}ExecutionProvider\n" in (
            result.stderr
        )
    names = sorted(p.name for p in gpu.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(64)]
    on_gpu = np.stack([image_array(gpu / n) for n in names]).astype(int)
    on_cpu = np.stack([image_array(cpu / n) for n in names]).astype(int)
    assert on_gpu.shape == (64, 32, 32, 3) and on_gpu.std() > 5
    assert len({a.tobytes() for a in on_gpu}) > 1  # different z, different images
    # The same seed gives the same faces on both providers, up to kernel rounding (TF32 and
    # fp16 on the GPU): a wrong binding, layout or output format would be far off.
    difference = np.abs(on_gpu - on_cpu)
    assert difference.max() <= (12 if precision == "fp16" else 6), difference.max()
    assert difference.mean() < 1.0, difference.mean()


def test_evaluate_an_exported_model_on_cuda(onnx_models, trained_run):
    run, _ = trained_run
    model = onnx_models["fp32"]
    options = ("--features", "pixels", "--num", 256)
    result = python_module("distgan.metrics.evaluate", "--onnx", model, "--run", run, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    # Issue 20, item 5: the CUDA provider ran; a silent fallback to the CPU would pass the rest.
    assert scored["onnx_provider"] == "CUDAExecutionProvider", scored
    assert scored["n_fake"] == 256 and scored["n_real"] == 240
    assert math.isfinite(scored["fid"]) and scored["fid"] > 0
    assert scored["torch_fid"] > 0 and scored["onnx_vs_torch_relative_fid_difference"] < 0.01


def inception_weights_present() -> str | None:
    path = (
        os.environ.get("DISTGAN_INCEPTION_WEIGHTS")
        or extractors.default_weights_dir() / extractors.INCEPTION_FILE
    )
    return str(path) if Path(path).is_file() else None


@pytest.mark.skipif(
    inception_weights_present() is None,
    reason=f"the FID Inception weights ({extractors.INCEPTION_FILE}) are not in {extractors.default_weights_dir()} and "
    "DISTGAN_INCEPTION_WEIGHTS does not name a copy (no internet to download them)",
)
def test_inception_fid_of_a_run_on_cuda(trained_run):
    run, _ = trained_run
    weights = ("--inception-weights", inception_weights_present())
    options = ("--features", "inception", "--num", 256, "--out", run.parent / "inception.jsonl")
    result = python_module("distgan.metrics.evaluate", "--run", run, *weights, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["feature_extractor"].startswith("inception-v3")
    assert scored["n_fake"] == 256 and scored["n_real"] == 240
    assert math.isfinite(scored["fid"]) and scored["fid"] > 0
    assert math.isfinite(scored["kid_mean"])
