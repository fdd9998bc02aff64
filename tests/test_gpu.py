"""The GPU paths of one GPU, end to end through the real entry points (`python launch/train.py`,
`accelerate launch`, `python -m export`, `python -m distgan.evaluate`), as the CPU suite runs them:

- training on cuda, streaming from the files (DALI GPU decode) and from the decoded-image cache
  in GPU memory, centred and with a crop box, and the two data paths giving the same batches;
- one process under `accelerate launch --num_processes 1` (Accelerate's device is then `cuda`
  without an index), and DALI's batches of a one-process GPU run really being on the GPU;
- fp16 with loss scaling and its resume (the scaler's state in the checkpoint), wgan-gp under
  bf16 and fp16, torch.compile, a SIGUSR1 stop and its resume, and bitwise repeatable runs with
  --deterministic;
- ONNX export (fp32, fp16, uint8) and generation with onnxruntime's CUDA provider (IO binding),
  standalone evaluation of an exported model, and FID with the real Inception weights.

Every test is skipped, with the reason, where torch sees no CUDA GPU; the ONNX generation tests
also skip where onnxruntime's CUDA provider cannot actually run, and the Inception test where the
weights file is not on the machine. Run it on a GPU machine with `python -m pytest -m gpu -rs`;
the runs are tiny (32 px, 16 channels, batch 8, 10-20 steps), a few minutes in all.

What one GPU cannot show. The 8-GPU and multi-node paths also rely on:
- NCCL all-reduce of the gradients across GPUs (DDP), and the other collectives (the stop-signal
  agreement, the weight-consistency check, the gathers of FID/KID) over NCCL;
- several processes, each with its own device (cuda:LOCAL_RANK) and DALI decoding on it, with
  DALI shard_id = the global rank, so that the shards are disjoint and cover the data;
- SyncBatchNorm across processes (--sync-bn, CUDA only);
- the multi-node rendezvous (main address and port, machine ranks, c10d) under
  `accelerate launch` and launch/slurm/train.sbatch.
The CPU suite runs the gloo versions of those with 2 real processes (tests/test_distributed.py:
identical weights, disjoint DALI shards, two "machines" on loopback, resume, SIGUSR1, a failing
process; tests/test_metrics.py: two processes give the one-process FID); NCCL, SyncBatchNorm and
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
from conftest import REPO, image_array, run_train, small_run, write_images
from safetensors.torch import load_file

from distgan import metrics
from distgan.checkpoint import load_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch.cuda.is_available() is False here",
    ),
]

CACHE_LINE = re.compile(r"decoded-image cache: 240 images, \d+ MiB in cuda(:\d+)? memory")
ON_CUDA = "distgan: 1 process(es) on cuda, batch 8/process (global 8)"
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
    result = train(out, faces_cache, "--max-steps", "10", "--decoded-cache", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# --- training on one GPU ---------------------------------------------------------------------


def test_cached_run_trains_on_cuda_from_gpu_memory(trained_run):
    out, result = trained_run
    assert ON_CUDA in result.stdout, result.stdout[-2000:]
    assert CACHE_LINE.search(result.stdout), result.stdout[-2000:]
    assert "done: step 10" in result.stdout
    assert_finite_run(out, [5, 10])
    assert (out / "checkpoints" / "step-00000010" / "trainer_state.json").is_file()


def test_streaming_gives_the_cached_batches_centred(tmp_path, faces_cache, trained_run):
    cached, _ = trained_run
    streamed = tmp_path / "streamed"
    result = train(streamed, faces_cache, "--max-steps", "10", "--decoded-cache", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA in result.stdout and "decoded-image cache" not in result.stdout
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
        flags = ("--max-steps", "10", "--decoded-cache", mode, "--crop-box", *CROP_BOX)
        result = train(out, faces_cache, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ON_CUDA in result.stdout
        assert bool(CACHE_LINE.search(result.stdout)) == (mode == "auto"), result.stdout[-2000:]
        saved = tomllib.loads((out / "config.toml").read_text())
        assert saved["data"]["crop_box"] == [24, 32, 80, 80]
        assert_finite_run(out, [5, 10])
        grids[mode] = image_array(out / "samples" / "real.png")
    assert grids["off"].std() > 5 and np.array_equal(grids["off"], grids["auto"])


def test_one_process_under_accelerate_launch_uses_the_gpu(tmp_path, faces_cache):
    out = tmp_path / "accelerate"
    result = train(out, faces_cache, "--max-steps", "10", launcher=accelerate_launch(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ON_CUDA in result.stdout, result.stdout[-2000:]
    # Accelerate's device is `cuda` with no index: DALI and the cache must still be on the GPU.
    assert CACHE_LINE.search(result.stdout), result.stdout[-2000:]
    assert result.stdout.count("done: step 10") == 1
    assert_finite_run(out, [5, 10])


def test_dali_batches_of_a_one_process_gpu_run_are_on_the_gpu(tmp_path):
    from distgan.data import ImageLoader, dali_device_id, find_images

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


def test_deterministic_runs_are_bitwise_identical(tmp_path, faces_cache):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        # --augment none: grid_sample's and the gathers' CUDA backward are not deterministic.
        flags = (
            "--max-steps",
            "10",
            "--deterministic",
            "--decoded-cache",
            "auto",
            "--augment",
            "none",
        )
        result = train(out, faces_cache, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ON_CUDA in result.stdout and CACHE_LINE.search(result.stdout)
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


def ort_cuda_problem(tmp_path: Path) -> str | None:
    """Why onnxruntime's CUDA provider cannot run here, or None: a tiny convolution model must get
    CUDAExecutionProvider first and run (onnxruntime-gpu lists the provider even where its CUDA
    or cuDNN libraries are missing, and then falls back to the CPU)."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as err:
        return f"onnx/onnxruntime is not installed ({err})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {ort.get_available_providers()})"
    weight = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in "xy")
    graph = helper.make_graph([conv], "probe", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "probe.onnx"
    onnx.save(model, path)
    try:
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        first = session.get_providers()[0]
        if first != "CUDAExecutionProvider":
            return f"onnxruntime {ort.__version__} cannot start its CUDA provider here (it fell back to {first}: CUDA/cuDNN libraries missing?)"
        y = session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})[0]
    except Exception as err:
        return f"onnxruntime's CUDA provider fails here: {type(err).__name__}: {str(err)[:200]}"
    if y[0, 0, 1, 1] != 9.0:
        return (
            f"onnxruntime's CUDA provider computes a wrong convolution here ({y[0, 0, 1, 1]} != 9)"
        )
    return None


@pytest.fixture(scope="module")
def ort_cuda(tmp_path_factory):
    problem = ort_cuda_problem(tmp_path_factory.mktemp("ort-probe"))
    if problem:
        pytest.skip(problem)


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
    result = python_module("distgan.evaluate", "--onnx", model, "--run", run, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["n_fake"] == 256 and scored["n_real"] == 240
    assert math.isfinite(scored["fid"]) and scored["fid"] > 0
    assert scored["torch_fid"] > 0 and scored["onnx_vs_torch_relative_fid_difference"] < 0.01


def inception_weights_present() -> str | None:
    path = (
        os.environ.get("DISTGAN_INCEPTION_WEIGHTS")
        or metrics.default_weights_dir() / metrics.INCEPTION_FILE
    )
    return str(path) if Path(path).is_file() else None


@pytest.mark.skipif(
    inception_weights_present() is None,
    reason=f"the FID Inception weights ({metrics.INCEPTION_FILE}) are not in {metrics.default_weights_dir()} and "
    "DISTGAN_INCEPTION_WEIGHTS does not name a copy (no internet to download them)",
)
def test_inception_fid_of_a_run_on_cuda(trained_run):
    run, _ = trained_run
    weights = ("--inception-weights", inception_weights_present())
    options = ("--features", "inception", "--num", 256, "--out", run.parent / "inception.jsonl")
    result = python_module("distgan.evaluate", "--run", run, *weights, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["feature_extractor"].startswith("inception-v3")
    assert scored["n_fake"] == 256 and scored["n_real"] == 240
    assert math.isfinite(scored["fid"]) and scored["fid"] > 0
    assert math.isfinite(scored["kid_mean"])
