"""The data a run trains on, decided before the loop and the same on every process: the folder
(the built-in faces, rendered once per machine, when none is given), its usable images (files
DALI cannot decode stop the run, or are skipped and listed in OUT/bad_images.txt, as
--on-bad-image says), their labels (data/labels.py) or their clusters (--clusters,
data/clusters.py) and the channel count ("auto": 1 when every image is grayscale, else 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed

from distgan.config.model import ModelConfig
from distgan.data.clusters import cluster_labels, require_matching_model
from distgan.data.faces import builtin_faces_dir, ensure_builtin_faces, render_size
from distgan.data.folder import (
    ImageFolder,
    count_channels,
    plural,
    scan_cache_path,
    scan_images,
    survey_folder,
)
from distgan.data.labels import Labels, read_labels, require_the_model_classes
from distgan.errors import UserError
from distgan.runtime.agree import from_main_process
from distgan.runtime.env import available_cpus, local_processes
from distgan.runtime.files import write_text_atomically
from distgan.runtime.paths import default_cache_dir

BAD_IMAGES_FILE = "bad_images.txt"


@dataclass(kw_only=True)
class PreparedImages:
    """What a run trains on, the same on every process."""

    data_dir: Path
    """The folder of images (the built-in faces' cache folder when none was given)."""

    files: list[str]
    """The usable (and, with labels, labelled) image files, as absolute paths."""

    labels: Labels | None
    """Their labels, aligned with `files`; None for an unconditional run."""


def _all_processes(found: dict) -> dict:
    """The union of every training process's dict (just `found` without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return found
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, found)
    return {key: value for part in parts for key, value in part.items()}


def prepare_images(
    accelerator, dc, resolution: int, out_dir: Path, model: ModelConfig | None = None
) -> PreparedImages:
    """The data folder, its usable image files and their labels, the same on every process.
    Renders the built-in faces once per machine; reads the labels (`dc.labels`) before anything
    slow; scans the files for ones DALI cannot decode (each process a share, in parallel) and
    stops with the list, or skips them, as `dc.on_bad_image` says; prints the images it trains
    on by format, the other files it skipped, and the images per class; with `dc.clusters`,
    clusters the usable images (or reads a resumed run's clusters back). `model`: the model a
    resumed or fine-tuned run goes on with, whose classes (or clusters) the data must give.

    `accelerator` is the run's Accelerator (or anything with its process attributes), `dc` its
    DataConfig.
    """
    data_dir = dc.data_dir
    if data_dir is None:
        size = render_size(resolution)
        if accelerator.is_local_main_process:
            if not builtin_faces_dir(dc.builtin_faces, size, dc.cache_dir).is_dir():
                print(f"rendering {dc.builtin_faces} built-in faces (once) ...", flush=True)
            ensure_builtin_faces(dc.builtin_faces, size, dc.cache_dir)
        accelerator.wait_for_everyone()
        data_dir = ensure_builtin_faces(dc.builtin_faces, size, dc.cache_dir)
    try:
        folder = survey_folder(data_dir)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None

    files, labels, unlabelled = folder.files, None, 0
    if dc.labels != "none":
        options = {"attributes": dc.attributes, "on_unlabelled": dc.on_unlabelled}
        labels = read_labels(dc.labels, folder.root, files, **options)
        files, unlabelled = labels.files, len(files) - len(labels.files)
    if model is not None:  # before the scan: a mismatch is known now
        require_the_model_classes(model, labels)
        require_matching_model(model, dc.clusters)
    rank, world = accelerator.process_index, accelerator.num_processes
    cache_dir = dc.cache_dir or default_cache_dir()
    cache = scan_cache_path(cache_dir, files, dc.crop_box, f"{rank}of{world}")
    workers = max(1, available_cpus() // local_processes())
    found = scan_images(files[rank::world], dc.crop_box, workers=workers, cache_path=cache)
    bad = _all_processes(found)
    if bad:
        files = _without_bad_images(accelerator, dc.on_bad_image, folder, files, bad, out_dir)
    accelerator.print(f"data: {folder.describe(files)}")
    if dc.clusters or (model is not None and model.cluster_shares):
        labels = cluster_labels(accelerator, files, folder.root, dc, out_dir, model)
        files = labels.files
        accelerator.print(f"self-conditioned on {labels.describe()}")
    elif labels is not None:
        labels = labels.only(files)
        skipped = f" ({plural(unlabelled, 'unlabelled image')} skipped)" if unlabelled else ""
        accelerator.print(f"labels from {dc.labels}: {labels.describe()}{skipped}")
    return PreparedImages(data_dir=Path(data_dir), files=files, labels=labels)


def _without_bad_images(accelerator, on_bad_image: str, folder: ImageFolder, files, bad, out_dir):
    """Those of `files` that are usable once the `bad` ones ({path: reason}) are listed in
    OUT/bad_images.txt, or a UserError naming them (on_bad_image "error", or none left)."""
    data_dir = folder.root
    listing = out_dir / BAD_IMAGES_FILE
    if accelerator.is_main_process:
        lines = "".join(f"{path}: {reason}\n" for path, reason in sorted(bad.items()))
        write_text_atomically(listing, lines)
    first = "; ".join(f"{Path(p).name}: {r}" for p, r in sorted(bad.items())[:3])
    summary = f"{len(bad)} of {len(files)} images in {data_dir} cannot be used ({first}"
    summary += ", ...)" if len(bad) > 3 else ")"
    if on_bad_image == "error":
        raise UserError(
            f"{summary}, all listed in {listing}: fix or remove them, or pass "
            "--on-bad-image skip to train on the rest"
        )
    usable = [f for f in files if f not in bad]
    if not usable:
        raise UserError(f"{summary}: no usable image is left in {data_dir}")
    accelerator.print(f"skipping {summary}; listed in {listing}")
    return usable


def resolve_channels(accelerator, requested: str, files: list[str]) -> int:
    """The channel count to train on, the same on every process: `requested` ("1" or "3"), or
    for "auto" 1 when every image in `files` is grayscale, else 3 (read by the main process)."""
    if requested != "auto":
        return int(requested)
    found = count_channels(files) if accelerator.is_main_process else None
    return from_main_process(found)
