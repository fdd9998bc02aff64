"""Report: sample grids are PNGs of the images' own colour model (RGB for 3 channels, mode L for
1), laid out square-ish with 2 px padding, with [-1, 1] mapped onto 0..255."""

import numpy as np
import pytest
import torch
from PIL import Image

from distgan.outputs.report import save_grid


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_grid_keeps_the_channel_count(tmp_path, channels, mode):
    levels = torch.linspace(-1, 1, 5)
    images = levels.view(5, 1, 1, 1).expand(5, channels, 28, 28).clone()
    save_grid(images, tmp_path / "grid.png")
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == mode
    assert grid.size == (3 * 30 + 2, 2 * 30 + 2)  # 5 images: 3 columns, 2 rows
    pixels = np.asarray(grid)
    first_row = pixels[2 + 14, 2 + 14 :: 30][:3]  # the centre of each image of the first row
    expected = [0, 64, 128] if channels == 1 else [[0] * 3, [64] * 3, [128] * 3]
    assert np.abs(first_row.astype(int) - np.array(expected)).max() <= 1
