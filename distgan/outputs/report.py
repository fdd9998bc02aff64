"""What a run shows its user: sample grids, metrics.jsonl, the losses plot (main process only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distgan.runtime.files import write_atomically

GRID_PADDING = 2  # black pixels around and between the images of a grid


def grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Images in [-1, 1], NCHW, as one CHW grid in [0, 1] of `columns` images a row (default:
    square-ish), row by row with GRID_PADDING black pixels between them (as torchvision's
    make_grid draws it; one image alone has no border). Plain torch: torchvision's import costs
    a second at start-up."""
    count, channels, height, width = images.shape
    images = images.clamp(-1, 1).sub(-1).div(2)
    if count == 1:
        return images[0]
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + GRID_PADDING, width + GRID_PADDING
    canvas = images.new_zeros(
        channels, rows * cell_h + GRID_PADDING, columns * cell_w + GRID_PADDING
    )
    for index in range(count):
        top, left = (
            (index // columns) * cell_h + GRID_PADDING,
            (index % columns) * cell_w + GRID_PADDING,
        )
        canvas[:, top : top + height, left : left + width] = images[index]
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> np.ndarray:
    """Save images in [-1, 1], NCHW, as one PNG grid (`grid`): RGB for 3 channels, gray (mode
    L) for 1."""
    canvas = grid(images.detach().float().cpu(), columns)
    pixels = canvas.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    write_atomically(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return pixels  # as saved: HxWx3, or HxW for gray


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a half-written last line (a crash mid-write) is ignored."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> None:
    """Redraw the losses and D outputs over steps from metrics.jsonl. After a resume the steps
    logged again replace the earlier ones, so the curve has no doubled-back segment."""
    by_step = {r["step"]: r for r in read_jsonl(metrics_path) if "loss_d" in r}
    if len(by_step) < 2:  # one point is no curve (and matplotlib's import costs a second)
        return
    import matplotlib  # here: only a run that draws its plot loads matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    records = [by_step[s] for s in sorted(by_step)]
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_d) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss_d"] for r in records], label="loss D")
    ax_loss.plot(steps, [r["loss_g"] for r in records], label="loss G")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_d.plot(steps, [r["d_real"] for r in records], label="D(x)")
    ax_d.plot(steps, [r["d_fake"] for r in records], label="D(G(z))")
    ax_d.set_ylabel("mean sigmoid(D)")
    ax_d.set_xlabel("step")
    ax_d.legend()
    fig.tight_layout()
    write_atomically(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
