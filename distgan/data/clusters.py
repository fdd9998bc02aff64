"""Self-conditioning (--clusters K): the training images grouped by k-means on their pixels, once
before training, and used as class labels that G and D are conditioned on (G picks its images'
clusters from z: ModelConfig.cluster_shares). Like self-conditioned GANs (Liu et al., 2020),
which cluster D's features during training; here the pixels are clustered once, so the labels
are fixed and cost nothing per step.

The main process clusters and writes OUT/clusters.csv (`file,class` rows, the label file format
of data/labels.py) before training, and sends the clusters to the other processes (errors
included: a failure there stops them all). A resumed run reads its clusters.csv again rather
than clustering anew.
"""

from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distgan.config.model import ModelConfig
from distgan.data.labels import CSV_HEADER, Labels, read_labels
from distgan.errors import UserError
from distgan.runtime.agree import main_decides
from distgan.runtime.env import available_cpus
from distgan.runtime.files import write_text_atomically

CLUSTERS_FILE = "clusters.csv"
CLUSTER_SIDE = 16  # images are clustered at this side: a digit's strokes, a face's coarse layout
RESTARTS = 3  # k-means runs from different starts; the tightest is kept
MAX_ITERATIONS = 100
SETTLED = 0.001  # a run stops when a pass moves at most this share of the images
SEED = 0  # the clusters do not depend on the training seed


def image_pixels(files: list[str], crop_box: list[int] | None) -> torch.Tensor:
    """The images as float rows [N, 3 * side^2] in [0, 1]: cropped as training crops them (the
    crop box, else the centred square), resized to CLUSTER_SIDE, RGB (a gray image's three
    channels are equal, so its distances are a gray image's, times three)."""

    def read(file: str) -> np.ndarray:
        with Image.open(file) as image:
            if crop_box is None:  # the centred square, as training takes it
                image.draft("RGB", (CLUSTER_SIDE * 2, CLUSTER_SIDE * 2))  # JPEG: decode smaller
                side = min(image.size)
                left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
                image = image.crop((left, top, left + side, top + side))
            else:
                left, top, width, height = crop_box
                image = image.crop((left, top, left + width, top + height))
            image = image.convert("RGB").resize((CLUSTER_SIDE, CLUSTER_SIDE), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(-1)

    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        rows = list(pool.map(read, files))
    return torch.from_numpy(np.stack(rows)).float().div_(255)


def kmeans_plus_plus(points: torch.Tensor, k: int, drawn: torch.Generator) -> torch.Tensor:
    """k starting centres [k, D] drawn as k-means++ does (Arthur and Vassilvitskii, 2007): each
    next one a point drawn with odds by its squared distance to the nearest centre so far, so
    spread out and never a copy of one (unless fewer than k points differ)."""
    first = int(torch.randint(len(points), (1,), generator=drawn))
    centres = [points[first]]
    nearest = (points - points[first]).square().sum(dim=1)
    for _ in range(k - 1):
        odds = nearest.cpu().double()
        odds = odds if odds.sum() > 0 else torch.ones_like(odds)
        chosen = points[int(torch.multinomial(odds, 1, generator=drawn))]
        centres.append(chosen)
        nearest = torch.minimum(nearest, (points - chosen).square().sum(dim=1))
    return torch.stack(centres)


def kmeans(points: torch.Tensor, k: int, *, seed: int = SEED) -> torch.Tensor:
    """Cluster indices [N] of `points` [N, D] (on their device): Lloyd's k-means from RESTARTS
    k-means++ starts, each until at most SETTLED of the points change
    cluster in a pass, the run with the least within-cluster squared distance kept. The same
    points give the same clusters. A cluster left without points keeps its centre."""
    drawn = torch.Generator().manual_seed(seed)
    settled = max(1, int(SETTLED * len(points)))
    best, best_spread = None, float("inf")
    for _ in range(RESTARTS):
        centres, assigned = kmeans_plus_plus(points, k, drawn), None
        for _ in range(MAX_ITERATIONS):
            # |p - c|^2 less |p|^2, the same for every centre: one matrix product per pass.
            nearest = (centres.square().sum(dim=1) - 2 * points @ centres.T).argmin(dim=1)
            moved = len(points) if assigned is None else int((nearest != assigned).sum())
            assigned = nearest
            members = torch.nn.functional.one_hot(assigned, k).to(points.dtype)
            counts = members.sum(dim=0)
            filled = counts > 0
            centres[filled] = (members.T @ points)[filled] / counts[filled, None]
            if moved <= settled:
                break
        spread = (points - centres[assigned]).square().sum().item()
        if spread < best_spread:
            best, best_spread = assigned, spread
    return best.cpu()


def require_enough_images(count: int, k: int) -> None:
    """A UserError unless there are at least `k` images to make `k` clusters of."""
    if count < k:
        raise UserError(
            f"--clusters {k} needs at least {k} images, and the data has {count}: lower --clusters"
        )


def cluster_images(
    files: list[str], k: int, crop_box: list[int] | None = None, device: torch.device | str = "cpu"
) -> list[int]:
    """Each file's cluster, numbered by size (0 the largest). The k-means runs on `device` (the
    run's: a GPU when there is one). Fewer than `k` distinct groups is a UserError."""
    require_enough_images(len(files), k)
    assigned = kmeans(image_pixels(files, crop_box).to(device), k)
    counts = torch.bincount(assigned, minlength=k)
    found = int((counts > 0).sum())
    if found < k:  # k-means++ leaves a cluster empty only when fewer than k images differ
        raise UserError(
            f"--clusters {k}: the images form only {found} distinct groups: lower --clusters "
            f"to {found} or fewer"
        )
    by_size = sorted(range(k), key=lambda c: (-int(counts[c]), c))
    renumber = {old: new for new, old in enumerate(by_size)}
    return [renumber[c] for c in assigned.tolist()]


def require_matching_model(model: ModelConfig | None, clusters: int) -> None:
    """Before any work, on every process: a UserError when the model a run goes on with (resumed,
    or --init-from) and --clusters disagree on whether it is self-conditioned."""
    if model is None or bool(model.cluster_shares) == bool(clusters):
        return
    if clusters:
        raise UserError(
            f"--clusters {clusters}: the model it starts from was not trained on clusters; "
            "drop --init-from to start a new run, or drop --clusters"
        )
    raise UserError(
        "the model it starts from is self-conditioned on its own run's clusters: resume in that "
        "run's --out-dir, or drop --init-from to start a new run"
    )


def cluster_labels(
    accelerator, files: list[str], data_dir: Path, dc, out_dir: Path, model: ModelConfig | None
) -> Labels:
    """The clusters of `files` as Labels, the same on every process: decided by the main process
    (clustered now and written to OUT/clusters.csv, or, when a run goes on with `model`, read
    from there) and sent to the others, errors included. `dc`: the run's DataConfig."""
    root, path = Path(data_dir).resolve(), Path(out_dir) / CLUSTERS_FILE

    def decide() -> tuple[list[str], list[int], int]:
        if model is None:
            accelerator.print(f"clustering {len(files)} images into {dc.clusters} (once) ...")
            found = cluster_images(files, dc.clusters, dc.crop_box, accelerator.device)
            table = io.StringIO()
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            writer.writerows(
                (Path(f).relative_to(root), c) for f, c in zip(files, found, strict=True)
            )
            write_text_atomically(path, table.getvalue())
            return files, found, dc.clusters
        if not path.is_file():
            raise UserError(
                f"the model is self-conditioned on its own run's clusters, and {path} is missing: "
                "resume in that run's --out-dir, or start a new run"
            )
        read = read_labels(str(path), root, files, on_unlabelled=dc.on_unlabelled)
        if len(read.classes) != len(model.cluster_shares):
            raise UserError(
                f"{path} holds {len(read.classes)} clusters and the model "
                f"{len(model.cluster_shares)}: resume in the run's own --out-dir, or start a "
                "new run"
            )
        return read.files, read.values, len(read.classes)

    kept, values, count = main_decides(accelerator, decide)
    names = [str(c) for c in range(count)]
    return Labels(conditioning="class", classes=names, files=kept, values=values, clustered=True)
