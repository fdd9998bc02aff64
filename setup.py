"""The dependencies, here rather than in pyproject.toml because one of them depends on the
cluster: DALI ships one wheel per CUDA major, and both install the same `nvidia/dali` folder, so
exactly one is asked for. `DISTGAN_CUDA=12 pip install -e .` picks the CUDA 12 build (README.md,
"CUDA 12 clusters"); the default is CUDA 13, the build of the reference torch.

Lower bounds are the releases CI installs and tests; upper bounds keep pip on tested majors.
"""

import os

from setuptools import setup

DALI = {"13": "nvidia-dali-cuda130>=2.4,<3", "12": "nvidia-dali-cuda120>=2.4,<3"}
cuda = os.environ.get("DISTGAN_CUDA", "13")
if cuda not in DALI:
    raise SystemExit(f"DISTGAN_CUDA={cuda!r} is not allowed: use 13 (the default) or 12")

setup(
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "accelerate>=1.15,<2",
        DALI[cuda],
        "numpy>=2.4,<3",
        "pillow>=13,<14",
        "safetensors>=0.8,<1",
        "tqdm>=4.70,<5",
        "matplotlib>=3.11,<4",
        "tomli-w>=1.2,<2",
        "torch-fidelity>=0.4,<0.5",
        "psutil>=7.2,<8",
        "huggingface_hub>=2.4,<3",
    ]
)
