"""The CPU suite stays on the CPU on a GPU machine (issue 20, item 2): a run that holds tests not
marked gpu hides CUDA from itself and from every process it starts (tests/conftest.py), so its
trainers run on the CPU (two processes on gloo, never rank 1 on a missing cuda:1; bitwise resumes
without cuDNN). Only the GPU suite run alone (`-m gpu`, or tests/gpu/test_gpu.py) keeps the GPUs.
On a GPU machine the first test fails if a test not marked gpu, or a trainer it starts, can see
a CUDA device."""

import json
import os
import sys

import pytest
import torch

from tests.helpers import REPO, gpu_suite_alone, run_train

SEEN = (
    "import json, os, torch\n"
    "from distgan.runtime.ort_providers import cuda_device_count\n"
    "print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.is_available(),"
    " cuda_device_count()]))\n"
)


def test_this_test_and_the_trainers_it_starts_see_no_cuda_device():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    # Started as run_train starts trainers (its environment and folder), asking torch and the
    # CUDA driver itself (what DALI and onnxruntime ask).
    started = run_train(launcher=[sys.executable, "-c", SEEN], timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    visible, torch_sees_cuda, driver_devices = json.loads(started.stdout.strip().splitlines()[-1])
    assert (visible, torch_sees_cuda, driver_devices) == ("", False, 0)


@pytest.mark.parametrize(
    "markexpr, args, alone",
    [
        ("gpu", ["tests"], True),
        (" gpu ", [], True),
        ("", ["tests/gpu/test_gpu.py"], True),
        ("", ["tests/gpu/test_gpu.py::test_compile_trains_on_cuda"], True),
        ("", ["tests"], False),
        ("", [], False),
        ("not slow", ["tests"], False),
        ("gpu or slow", ["tests"], False),
        ("", ["tests/gpu/test_gpu.py", "tests/integration/test_train.py"], False),
    ],
)
def test_only_the_gpu_suite_run_alone_keeps_cuda(markexpr, args, alone):
    assert gpu_suite_alone(markexpr, args, REPO) is alone
