"""The sample grid's fixed latents and labels (training/tasks.py SampleGrid): unconditional, a
square-ish grid of num_samples z; conditional, one row per class in label order, each column one
z shared by every row."""

import torch

from distgan.config.model import ModelConfig
from distgan.training.tasks import SampleGrid


def test_the_sample_grid_has_a_row_per_class_and_a_z_per_column():
    digits = ModelConfig(
        resolution=28, channels=1, conditioning="class", classes=[str(d) for d in range(10)]
    )
    grid = SampleGrid.fixed(digits, 64, seed=0, device="cpu")
    assert grid.columns == 6 and grid.labels.tolist()[:7] == [0] * 6 + [1]
    assert grid.labels.tolist()[-1] == 9 and len(grid.labels) == 60
    assert grid.z.shape == (60, 100) and torch.equal(grid.z[:6], grid.z[6:12])
    plain = SampleGrid.fixed(ModelConfig(resolution=28, channels=1), 64, seed=0, device="cpu")
    assert plain.labels is None and plain.columns is None and plain.z.shape == (64, 100)
    again = SampleGrid.fixed(ModelConfig(resolution=28, channels=1), 64, seed=0, device="cpu")
    assert torch.equal(plain.z, again.z)
