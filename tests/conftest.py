"""The tests' fixtures, and the run-wide rule that a run holding CPU tests hides CUDA. Helpers that
are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import gpu_suite_alone, write_images


def pytest_configure(config):
    """A run that holds tests not marked gpu hides CUDA from itself and from every process it
    starts, before anything asks CUDA for its devices: on a GPU machine those tests run on the
    CPU as in CI (two processes on gloo, bitwise resumes). The GPU suite keeps the GPUs when run
    alone (`python -m pytest -m gpu`); in a mixed run it is skipped and says so."""
    args = list(config.args)
    if not gpu_suite_alone(config.option.markexpr or "", args, config.invocation_params.dir):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def cpu_for_cpu_tests(request, monkeypatch):
    """A test not marked gpu, and whatever it starts, sees no CUDA device (also where the run
    did not hide CUDA: pytest_configure)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one state per process: an Accelerator made by one test (with its
    precision) must not decide the next test's."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """24 solid-colour JPEGs of 40x30 px in subfolders."""
    write_images(tmp_path / "jpegs", 24)
    return tmp_path / "jpegs"


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """JPEGs, PNGs (RGB and RGBA), a grayscale JPEG and a non-image file, at odd sizes."""
    folder = tmp_path / "mixed"
    write_images(folder, 6, size=(50, 70))
    write_images(folder, 4, size=(33, 33), fmt="PNG", start=6)
    Image.new("L", (64, 48), 128).save(folder / "gray.jpg", quality=95)
    Image.new("RGBA", (40, 40), (255, 0, 0, 255)).save(folder / "alpha.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def faces_cache(tmp_path_factory) -> Path:
    """A cache folder holding a small set of built-in faces, rendered once per test session."""
    from distgan.data.faces import ensure_builtin_faces

    cache = tmp_path_factory.mktemp("faces-cache")
    ensure_builtin_faces(240, 128, cache)
    return cache
