"""The image pipeline: NVIDIA DALI reads, decodes (on the GPU when there is one), crops, resizes,
flips and normalises a folder of images (the formats of data/folder.py), sharded across the
training processes, in the order of data/order.py; or serves the same batches from a cache of the
decoded images. Also `python -m distgan.data.loader scan DIR` (data/folder.py's checks).

The one distgan module that imports DALI.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from distgan.data.folder import scan_images, survey_folder
from distgan.data.labels import Labels
from distgan.data.order import epoch_flips, epoch_order, shard_layout, steps_per_epoch
from distgan.errors import exit_on_user_error
from distgan.runtime.env import available_memory, local_processes

# DALI decodes JPEG 2000 on the CPU with OpenCV, which warns on every image of a bare codestream
# (.j2k: no colour space box, sRGB assumed), each epoch: keep its warnings out of the log.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


def dali_device_id(device: torch.device) -> int | None:
    """The CUDA device DALI decodes on for a training device, or None for CPU decoding.

    `cuda` without an index (Accelerate's device for one process) means the current device.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def decoder_args(device_id: int | None, channels: int) -> dict:
    """DALI's image decoder arguments: on the GPU (`mixed`, nvJPEG) or the CPU, to RGB or GRAY.
    On the GPU without the hardware JPEG engine (A100, H100, H200): DALI hands it a share of each
    batch by position, so a file could be decoded by either engine, a level apart, in the
    streamed and cached epochs that give the same batches."""
    decoding = {"device": "cpu", "output_type": types.GRAY if channels == 1 else types.RGB}
    if device_id is not None:
        decoding.update(device="mixed", hw_decoder_load=0.0)
    return decoding


def processes_sharing(device: torch.device, processes_here: int) -> int:
    """How many of this machine's processes hold a cache on `device`: all of them in host
    memory, and on a GPU only those placed on the same GPU (normally each process has its own)."""
    if device.type != "cuda":
        return processes_here
    return max(1, math.ceil(processes_here / max(1, torch.cuda.device_count())))


def memory_for_cache(device: torch.device) -> int:
    """Bytes a decoded-image cache may take on `device`: a quarter of what is free there (host
    memory within the job's cgroup limit), shared by the processes that keep a copy there."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory()
    return free // 4 // processes_sharing(device, local_processes())


def label_table(labels: Labels) -> torch.Tensor:
    """The labels as a tensor: class indices int64 [N], or multi-hot attributes float32 [N, K]."""
    if labels.conditioning == "class":
        return torch.tensor(labels.values, dtype=torch.int64)
    return torch.tensor(labels.values, dtype=torch.float32).reshape(-1, len(labels.classes))


class ImageLoader:
    """One process's stream of image batches: float32 in [-1, 1], shaped NCHW (C = `channels`:
    3 for RGB, 1 for gray, which DALI converts colour images to) and laid out channels-last
    (NHWC strides; `.contiguous()` gives the classic layout), on the training device.

    With `decoded_cache="auto"` and enough memory, the first epoch decodes every image once (each
    process all of them, since every epoch draws a new global order) into a uint8 tensor on the
    device; epochs are then cut from it with the same order and flips as the streaming pipeline,
    so the batches are the same either way.
    """

    def __init__(
        self,
        files: list[str],
        *,
        resolution: int,
        batch_size: int,
        shard_id: int,
        num_shards: int,
        seed: int,
        channels: int = 3,
        crop_box: list[int] | None = None,
        flip: bool = True,
        num_threads: int = 2,
        device_id: int | None = None,
        decoded_cache: str = "off",
        labels: torch.Tensor | None = None,
    ):
        """`shard_id` is the global rank; `device_id` the local CUDA device, or None for CPU;
        `labels` one per file (class indices [N], or multi-hot attributes [N, K]), or None."""
        if not files:
            raise ValueError("ImageLoader needs at least one image file")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} is not in [0, {num_shards})")
        if decoded_cache not in ("auto", "off"):
            raise ValueError(f"decoded_cache={decoded_cache!r} is not allowed: use auto or off")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed: use 1 or 3")
        self.files = list(files)
        self.resolution = resolution
        self.channels = channels
        self.batch_size = batch_size
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.seed = seed
        self.crop_box = crop_box
        self.flip = flip
        self.num_threads = num_threads
        self.device_id = device_id
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.steps_per_epoch = steps_per_epoch(len(files), num_shards, batch_size)
        self.cache: torch.Tensor | None = None
        self.cache_bytes = len(self.files) * channels * resolution * resolution
        self.cache_planned = decoded_cache == "auto"
        if labels is not None and len(labels) != len(files):
            raise ValueError(f"{len(labels)} labels for {len(files)} files: give one per file")
        self.labels = None if labels is None else labels.to(self.device)

    @classmethod
    def for_run(cls, files: list[str], cfg, accelerator, labels: Labels | None) -> ImageLoader:
        """The loader of one training process: `cfg` is the run's Config, `accelerator` its
        Accelerator (the shard is the global rank; decoding on the process's GPU, if any),
        `labels` those of `files` (or None)."""
        dc, tc = cfg.data, cfg.train
        return cls(
            files,
            resolution=cfg.model.resolution,
            batch_size=tc.batch_size,
            shard_id=accelerator.process_index,
            num_shards=accelerator.num_processes,
            seed=tc.seed,
            channels=cfg.model.channels,
            crop_box=dc.crop_box,
            flip=dc.flips_for(cfg.model.channels),
            num_threads=dc.num_threads,
            device_id=dali_device_id(accelerator.device),
            decoded_cache=dc.decoded_cache,
            labels=None if labels is None else label_table(labels),
        )

    def plan_cache(self, first_step: int, last_step: int) -> bool:
        """Whether the decoded cache is still planned for a run of steps [first_step, last_step):
        a run within one epoch reads each image at most once, so it streams instead (decoding
        every image ahead would only delay its first step)."""
        if self.cache_planned:
            spe = self.steps_per_epoch
            self.cache_planned = last_step > first_step and (
                first_step // spe != (last_step - 1) // spe
            )
        return self.cache_planned

    def _pipeline(
        self, files: list[str], flips: np.ndarray | None, seed: int, shard: tuple, indices=None
    ):
        """DALI: read `files` (shard `shard` = (id, count)), decode, crop, resize, flip by `flips`
        and normalise to float; without `flips`, no flip and uint8 out (for the cache). With
        `indices` (each file's index in `self.files`), each image's index comes out beside it,
        read and sharded with the image, for its label."""
        batch_size = self.batch_size
        placement = {"num_threads": self.num_threads, "device_id": self.device_id}

        @pipeline_def(batch_size=batch_size, seed=seed, **placement)
        def image_pipeline():
            # Plain reads, not mmap: faster on small JPEGs (bench/README.md), and what network file
            # systems want.
            reading = {"random_shuffle": False, "dont_use_mmap": True, "name": "Reader"}
            if indices is not None:
                reading["labels"] = [int(i) for i in indices]
            encoded, index = fn.readers.file(
                files=files, shard_id=shard[0], num_shards=shard[1], **reading
            )
            decoding = decoder_args(self.device_id, self.channels)
            if self.crop_box is None:
                # The centred largest square, decoded alone: rows outside it are skipped.
                shape = fn.peek_image_shape(encoded)
                side = fn.cast(dmath.min(shape[0], shape[1]), dtype=types.FLOAT)
                images = fn.decoders.image_crop(encoded, crop_w=side, crop_h=side, **decoding)
            else:
                left, top, width, height = self.crop_box
                images = fn.decoders.image(encoded, **decoding)
                padding = {"out_of_bounds_policy": "pad", "fill_values": 0}
                box = {"start": [left, top], "shape": [width, height], "axis_names": "WH"}
                images = fn.slice(images, **box, **padding)
            size = self.resolution
            images = fn.resize(images, size=[size, size], antialias=True)
            if flips is None:
                return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC")
            flip_batches = (flips[i : i + batch_size] for i in range(0, len(flips), batch_size))
            mirror = (
                fn.external_source(source=flip_batches, batch=True, dtype=types.INT32)
                if self.flip
                else 0
            )
            to_unit = {"mean": [127.5] * self.channels, "std": [127.5] * self.channels}
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, dtype=types.FLOAT, output_layout="HWC", **to_unit
            )
            if indices is None:
                return images
            return images, (index if self.device_id is None else index.gpu())

        return image_pipeline()

    def _run(self, pipe, outputs=("images",)) -> Iterator[list[torch.Tensor]]:
        pipe.build()
        iterator = DALIGenericIterator(
            pipe, list(outputs), reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL
        )
        try:
            for batch in iterator:
                yield [batch[0][name] for name in outputs]
        finally:
            del iterator, pipe

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The image batches of `epoch` from `start_step` on (a resumed epoch skips what it has
        seen). Each may be a reused buffer: clone it to keep it past the next batch."""
        for images, _ in self.labelled_epoch(epoch, start_step):
            yield images

    def labelled_epoch(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(images, their labels) batches of `epoch` as `epoch` gives them; labels None without a
        label table. The labels are new tensors, the images may be reused buffers."""
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is not in [0, {self.steps_per_epoch})")
        if self.cache_planned:
            self.build_cache()
        if self.cache is not None:
            yield from self._cached_epoch(epoch, start_step)
            return
        order = epoch_order(len(self.files), epoch, self.seed, self.num_shards, self.batch_size)
        flips = epoch_flips(len(order), epoch, self.seed)
        layout = shard_layout(order, self.num_shards, self.batch_size, start_step)
        files = [self.files[i] for i in layout]
        shard = (self.shard_id, self.num_shards)
        seed = self.seed * 1000 + epoch
        indices = None if self.labels is None else layout
        pipe = self._pipeline(files, self._share(flips, start_step), seed, shard, indices)
        outputs = ("images",) if indices is None else ("images", "indices")
        for images, *index in self._run(pipe, outputs):
            labels = self.labels[index[0].view(-1).long()] if index else None
            yield images.permute(0, 3, 1, 2), labels  # NHWC in memory, NCHW to the model

    def build_cache(self) -> torch.Tensor | None:
        """With decoded_cache="auto", decode and resize every image once into `self.cache`:
        uint8 [N, R, R, C] on the training GPU if it fits there, else in host memory; None
        (stream instead) if it fits nowhere. Called by the first epoch, or before it."""
        if not self.cache_planned:
            return self.cache
        self.cache_planned = False
        if self.cache_bytes <= memory_for_cache(self.device):
            where = self.device
        elif self.device.type == "cuda" and self.cache_bytes <= memory_for_cache(
            torch.device("cpu")
        ):
            where = torch.device("cpu")
        else:
            return None
        size = self.resolution
        shape = (len(self.files), size, size, self.channels)
        cache = torch.empty(shape, dtype=torch.uint8, device=where)
        filled = 0
        for (images,) in self._run(self._pipeline(self.files, None, self.seed, (0, 1))):
            cache[filled : filled + images.shape[0]].copy_(images)
            filled += images.shape[0]
        self.cache = cache
        return cache

    def _cached_epoch(self, epoch: int, start_step: int) -> Iterator[tuple]:
        """The streaming pipeline's batches, cut from the cache: indices and flips go to the
        device once per epoch, so a batch costs no host-device sync."""
        order = epoch_order(len(self.files), epoch, self.seed, self.num_shards, self.batch_size)
        cache = self.cache
        indices = torch.from_numpy(self._share(order, start_step)).to(cache.device)
        if self.flip:
            flips = self._share(epoch_flips(len(order), epoch, self.seed), start_step)
            mirrored = torch.from_numpy(flips.astype(bool)).to(self.device)
        # DALI normalises as (x - mean) * (1 / std) in float32: the same here, so bitwise equal.
        scale = torch.tensor(1 / 127.5, dtype=torch.float32, device=self.device)
        staged = cache.device != self.device  # a host cache feeding a GPU
        labels = None if self.labels is None else self.labels[indices.to(self.labels.device)]
        for first in range(0, len(indices), self.batch_size):
            batch_indices = indices[first : first + self.batch_size]
            if staged:  # gather into pinned memory, so the copy to the GPU runs asynchronously
                pinned = torch.empty(
                    (len(batch_indices), *cache.shape[1:]), dtype=cache.dtype, pin_memory=True
                )
                images = torch.index_select(cache, 0, batch_indices, out=pinned)
                images = images.to(self.device, non_blocking=True)
            else:
                images = cache.index_select(0, batch_indices)
            if self.flip:
                flip = mirrored[first : first + self.batch_size].view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(2), images)
            batch_labels = None if labels is None else labels[first : first + self.batch_size]
            yield images.permute(0, 3, 1, 2).float().sub_(127.5).mul_(scale), batch_labels

    def epoch_files(self, epoch: int, start_step: int = 0) -> list[str]:
        """The files this process reads in `epoch` from `start_step`, in order."""
        order = epoch_order(len(self.files), epoch, self.seed, self.num_shards, self.batch_size)
        return [self.files[i] for i in self._share(order, start_step)]

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(index into `files`, is-padding flag) of each sample this process reads in `epoch`, in
        order. Over all processes the non-padding samples are every file exactly once."""
        order = epoch_order(len(self.files), epoch, self.seed, self.num_shards, self.batch_size)
        positions = self._share(np.arange(len(order)), 0)
        return order[positions], positions >= len(self.files)

    def _share(self, per_position: np.ndarray, start_step: int) -> np.ndarray:
        """This process's part of a per-position array of the epoch, from `start_step` on."""
        blocks = per_position.reshape(-1, self.num_shards, self.batch_size)
        return blocks[start_step:, self.shard_id].reshape(-1)


def main(argv: list[str] | None = None) -> None:
    """`python -m distgan.data.loader scan DIR`: list the files training cannot use, and why."""
    parser = argparse.ArgumentParser(prog="python -m distgan.data.loader")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="list the bad image files in a folder")
    scan.add_argument("data_dir")
    scan.add_argument(
        "--crop-box", type=int, nargs=4, metavar="N", help="also flag images too small for it"
    )
    scan.add_argument("--workers", type=int, help="parallel checks (default: all cores)")
    args = parser.parse_args(argv)
    with exit_on_user_error(OSError, ValueError):  # survey_folder's errors name the folder
        folder = survey_folder(args.data_dir)
    files = folder.files
    bad = scan_images(files, args.crop_box, args.workers)
    for path, reason in bad.items():
        print(f"{path}: {reason}")
    print(folder.describe(), file=sys.stderr)
    print(f"{len(files)} images, {len(bad)} bad", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
