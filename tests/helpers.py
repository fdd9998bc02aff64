"""What the tests share that is not a fixture: the repository's path, the small GAN's flags, tiny
image folders made on the fly (no dataset can be downloaded here), and running the real entry
points as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]


SMALL_GAN = ["--resolution", "32", "--g-channels", "16", "--d-channels", "16", "--batch-size", "8"]


GPU_SUITE = REPO / "tests" / "gpu" / "test_gpu.py"


STARTING_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")  # before pytest_configure


def gpu_suite_alone(markexpr: str, args: list[str], base: Path) -> bool:
    """Whether a run can hold only `gpu` tests: `-m gpu`, or every path given (relative to
    `base`) inside tests/gpu/test_gpu.py."""
    if markexpr.strip() == "gpu":
        return True
    paths = [(base / arg.split("::")[0]).resolve() for arg in args]
    return bool(paths) and all(path == GPU_SUITE for path in paths)


def gpus_of_this_machine() -> str | None:
    """What shows NVIDIA GPUs here (distgan.runtime.env.visible_gpus) to the environment this run
    started with, before it hid them; None on a machine without."""
    from distgan.runtime.env import visible_gpus

    environ = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if STARTING_CUDA_VISIBLE_DEVICES is not None:
        environ["CUDA_VISIBLE_DEVICES"] = STARTING_CUDA_VISIBLE_DEVICES
    return visible_gpus(environ)


def solid_colour(index: int) -> tuple[int, int, int]:
    """A colour that encodes `index` (< 216), far enough from its neighbours to survive JPEG."""
    return (index % 6 * 51, index // 6 % 6 * 51, index // 36 % 6 * 51)


def colour_index(pixel_rgb) -> int:
    """The inverse of solid_colour for a decoded pixel in [0, 255]."""
    r, g, b = (int(round(c / 51)) for c in pixel_rgb)
    return r + 6 * g + 36 * b


def write_images(folder: Path, count: int, size=(40, 30), fmt="JPEG", start=0) -> list[Path]:
    """`count` solid-colour images named by index (a subfolder every 10, to test recursion)."""
    paths = []
    for i in range(start, start + count):
        sub = folder / f"part{i // 10}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.new("RGB", size, solid_colour(i)).save(path, format=fmt, quality=95)
        paths.append(path)
    return paths


def write_digits(folder, count: int, size: int = 28) -> None:
    """`count` drawn digits (PIL's font, random place and size), white on black like MNIST."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.new("L", (size, size))
        font = ImageFont.load_default(size=int(rng.integers(16, 24)))
        x, y = rng.integers(2, 10, size=2)
        ImageDraw.Draw(image).text((int(x), int(y) - 4), str(i % 10), fill=255, font=font)
        image.save(folder / f"{i:05d}.png")


def assert_same_weights(straight: Path, resumed: Path, last_step: int) -> dict:
    """The generator, D and the EMA of two runs bitwise equal at `last_step` (a resumed run
    against an uninterrupted one); returns the generator file's tensors."""
    import torch
    from safetensors.torch import load_file

    checkpoint = f"checkpoints/step-{last_step:08d}"
    found = {}
    for name in (
        "generator.safetensors",
        f"{checkpoint}/model_1.safetensors",
        f"{checkpoint}/ema.safetensors",
    ):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        found.setdefault("generator", a)
    return found["generator"]


# Outputs often enough for a 20-step run to log, sample and checkpoint (every 10 steps).
FREQUENT_OUTPUTS = [
    "--log-every",
    "5",
    "--sample-every",
    "10",
    "--ckpt-every",
    "10",
    "--num-samples",
    "8",
]


def two_gloo_processes() -> list[str]:
    """`accelerate launch` for 2 CPU processes (gloo DDP) on this machine, in fp32."""
    return [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def free_port() -> int:
    """A TCP port that was free a moment ago, for a run's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(*args: str, launcher: list[str] | None = None, timeout: int = 600, env=None):
    """Run the real entry point as a user would; return the CompletedProcess (never raises)."""
    command = [*(launcher or [sys.executable]), str(REPO / "launch" / "train.py"), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


def run_module(*args, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m ARGS` from the checkout, as a user runs it; the CompletedProcess (never raises
    on a failing command)."""
    command = [sys.executable, "-m", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def run_generate(*args) -> subprocess.CompletedProcess:
    """`python -m export generate ARGS`, as a user runs it."""
    return run_module("export", "generate", *args, timeout=300)


def assert_one_line_errors(run, cases) -> None:
    """Each (args, message) of `cases` makes `run(*args)` exit 2 with one stderr line, "error: ..."
    holding the message."""
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def image_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def small_run(out_dir, faces_cache, *extra, sample_every: int = 10) -> list:
    """Flags of a small, fast training run on the cached built-in faces (extra flags win)."""
    data = ["--out-dir", out_dir, "--cache-dir", faces_cache, "--builtin-faces", "240"]
    every = ["--log-every", "5", "--sample-every", sample_every, "--ckpt-every", "10"]
    return [*data, *SMALL_GAN, *every, *extra]


def linear_onnx_generator(
    path: Path, *, z_dim=8, resolution=4, channels=1, z_distribution="uniform", seed=0
) -> np.ndarray:
    """A hand-built stand-in for an exported generator, small and fast with an exact reference:
    image = tanh(z @ W) as float32 [batch, channels, resolution, resolution], with distgan's
    metadata keys. Returns W (float32 [z_dim, channels * resolution**2])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = channels * resolution * resolution
    weight = np.random.default_rng(seed).standard_normal((z_dim, size)).astype(np.float32)
    shape = np.array([-1, channels, resolution, resolution], dtype=np.int64)
    nodes = [
        helper.make_node("MatMul", ["z", "weight"], ["hidden"]),
        helper.make_node("Tanh", ["hidden"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear_generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", z_dim])],
        [
            helper.make_tensor_value_info(
                "image", TensorProto.FLOAT, ["batch", channels, resolution, resolution]
            )
        ],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(shape, "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime reads, whatever onnx writes by default
    metadata = {"z_dim": z_dim, "resolution": resolution, "channels": channels}
    for key, value in {**metadata, "z_distribution": z_distribution}.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


def cuda_hidden_by_this_run() -> bool:
    """Whether this pytest run hid CUDA because it holds tests not marked gpu
    (conftest.pytest_configure)."""
    return STARTING_CUDA_VISIBLE_DEVICES != "" and os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def tiny_gan(model, real, **train):
    """A CPU fp32 GAN as the trainer builds it for `model` (a ModelConfig), with `train` over the
    training defaults (batch size: len(real)); the accelerator, the TrainConfig, the GAN and the
    real batch in the trainer's memory layout."""
    import torch

    from bench.training import fresh_accelerator
    from distgan.config.sections import TrainConfig
    from distgan.training.gan import build_gan

    accelerator = fresh_accelerator("no", torch.device("cpu"))
    tc = TrainConfig(batch_size=len(real), **train)
    gan = build_gan(accelerator, model, tc, images=len(real))
    return accelerator, tc, gan, real.contiguous(memory_format=torch.channels_last)
