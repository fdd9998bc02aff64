"""The image pipeline: NVIDIA DALI reads, decodes (on the GPU when there is one), crops, resizes,
flips and normalises a folder of JPEG/PNG files, sharded across the training processes.

The order of the data is ours, not DALI's: each epoch is one global permutation (from the seed and
the epoch number), padded by wrapping to a whole number of global batches, so that every process
runs the same number of steps and no image is dropped. Global batch k is entries [k*W*B, (k+1)*W*B)
of that order, and process r takes the r-th block of B. That order is handed to
`fn.readers.file` laid out so that its contiguous shard `shard_id=r` is exactly process r's share,
which also makes resuming mid-epoch exact: start the list at the resumed step. Flips are drawn the
same way, from the seed, per position in the order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def find_images(data_dir: str | os.PathLike) -> list[str]:
    """All JPEG and PNG files under `data_dir` (recursively), sorted, as absolute paths."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist: check the --data-dir path")
    if not root.is_dir():
        raise NotADirectoryError(f"data_dir {root} is not a folder: pass the folder of images")
    files = sorted(
        str(p.resolve())
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(
            f"data_dir {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "point --data-dir at a folder of JPEG/PNG files"
        )
    return files


def steps_per_epoch(num_files: int, num_shards: int, batch_size: int) -> int:
    """Steps in one epoch, the same on every process: the last global batch is filled up."""
    return math.ceil(num_files / (num_shards * batch_size))


def epoch_order(num_files: int, epoch: int, seed: int, global_batch: int) -> np.ndarray:
    """The global sample order of one epoch: a permutation wrapped to whole global batches."""
    rng = np.random.default_rng([seed, epoch])
    steps = math.ceil(num_files / global_batch)
    return np.resize(rng.permutation(num_files), steps * global_batch)


def epoch_flips(length: int, epoch: int, seed: int) -> np.ndarray:
    """Per-position horizontal-flip decisions of one epoch (independent of the order's RNG)."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2, length, dtype=np.int32)


def shard_layout(
    order: np.ndarray, num_shards: int, batch_size: int, start_step: int
) -> np.ndarray:
    """Rearrange a global order so that contiguous shard r holds process r's batches from
    `start_step` on: [steps, shards, batch] -> [shards, steps, batch]."""
    blocks = order.reshape(-1, num_shards, batch_size)[start_step:]
    return blocks.transpose(1, 0, 2).reshape(-1)


class ImageLoader:
    """One process's stream of image batches: NCHW float32 in [-1, 1] on the training device."""

    def __init__(
        self,
        files: list[str],
        *,
        resolution: int,
        batch_size: int,
        shard_id: int,
        num_shards: int,
        seed: int,
        crop_box: list[int] | None = None,
        flip: bool = True,
        num_threads: int = 2,
        device_id: int | None = None,
    ):
        """`shard_id` is the global rank; `device_id` the local CUDA device, or None for CPU."""
        if not files:
            raise ValueError("ImageLoader needs at least one image file")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} is not in [0, {num_shards})")
        self.files = list(files)
        self.resolution = resolution
        self.batch_size = batch_size
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.seed = seed
        self.crop_box = crop_box
        self.flip = flip
        self.num_threads = num_threads
        self.device_id = device_id
        self.steps_per_epoch = steps_per_epoch(len(files), num_shards, batch_size)

    def _pipeline(self, files: list[str], flips: np.ndarray, epoch: int):
        batch_size = self.batch_size
        flip_batches = (flips[i : i + batch_size] for i in range(0, len(flips), batch_size))

        @pipeline_def(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self.seed * 1000 + epoch,
        )
        def image_pipeline():
            encoded, _ = fn.readers.file(
                files=files,
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                random_shuffle=False,
                name="Reader",
            )
            decode_on = "mixed" if self.device_id is not None else "cpu"
            images = fn.decoders.image(encoded, device=decode_on, output_type=types.RGB)
            size = self.resolution
            if self.crop_box is None:
                images = fn.resize(images, resize_shorter=size, antialias=True)
                crop = (size, size)  # centred
            else:
                left, top, width, height = self.crop_box
                images = fn.slice(
                    images, start=[left, top], shape=[width, height], axis_names="WH",
                    out_of_bounds_policy="pad", fill_values=0,
                )  # fmt: skip
                images = fn.resize(images, size=[size, size], antialias=True)
                crop = None
            mirror = (
                fn.external_source(source=flip_batches, batch=True, dtype=types.INT32)
                if self.flip
                else 0
            )
            return fn.crop_mirror_normalize(
                images, crop=crop, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3,
                dtype=types.FLOAT, output_layout="CHW",
            )  # fmt: skip

        return image_pipeline()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from `start_step` on (a resumed epoch skips what it has seen).

        Each yielded tensor is DALI's buffer: clone it to keep it past the next batch.
        """
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is not in [0, {self.steps_per_epoch})")
        global_batch = self.num_shards * self.batch_size
        order = epoch_order(len(self.files), epoch, self.seed, global_batch)
        flips = epoch_flips(len(order), epoch, self.seed)
        layout = shard_layout(order, self.num_shards, self.batch_size, start_step)
        pipe = self._pipeline(
            [self.files[i] for i in layout], self._share(flips, start_step), epoch
        )
        pipe.build()
        iterator = DALIGenericIterator(
            pipe, ["images"], reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL
        )
        try:
            for batch in iterator:
                yield batch[0]["images"]
        finally:
            del iterator, pipe

    def epoch_files(self, epoch: int, start_step: int = 0) -> list[str]:
        """The files this process reads in `epoch` from `start_step`, in order."""
        global_batch = self.num_shards * self.batch_size
        order = epoch_order(len(self.files), epoch, self.seed, global_batch)
        return [self.files[i] for i in self._share(order, start_step)]

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(index into `files`, is-padding flag) of each sample this process reads in `epoch`, in
        order. Over all processes the non-padding samples are every file exactly once."""
        global_batch = self.num_shards * self.batch_size
        order = epoch_order(len(self.files), epoch, self.seed, global_batch)
        positions = self._share(np.arange(len(order)), 0)
        return order[positions], positions >= len(self.files)

    def _share(self, per_position: np.ndarray, start_step: int) -> np.ndarray:
        """This process's part of a per-position array of the epoch, from `start_step` on."""
        blocks = per_position.reshape(-1, self.num_shards, self.batch_size)
        return blocks[start_step:, self.shard_id].reshape(-1)
