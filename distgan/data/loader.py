"""The image pipeline: NVIDIA DALI reads, decodes (on the GPU when there is one), crops, resizes,
flips and normalises a folder of images (JPEG, PNG, WebP, BMP, TIFF, PNM, JPEG 2000: the formats
DALI's image decoder reads), sharded across the training processes.

The order of the data is ours, not DALI's: each epoch is one global permutation (from the seed and
the epoch number), padded by wrapping to a whole number of global batches, so that every process
runs the same number of steps and no image is dropped. Global batch k is entries [k*W*B, (k+1)*W*B)
of that order, and process r takes the r-th block of B. That order is handed to
`fn.readers.file` laid out so that its contiguous shard `shard_id=r` is exactly process r's share,
which also makes resuming mid-epoch exact: start the list at the resumed step. Flips are drawn the
same way, from the seed, per position in the order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import nvidia.dali.math as dmath
import torch
import torch.distributed
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image, UnidentifiedImageError

from distgan.data.faces import (
    builtin_faces_dir,
    default_cache_dir,
    ensure_builtin_faces,
    render_size,
)
from distgan.errors import UserError, exit_on_user_error, first_line
from distgan.runtime.env import available_cpus, available_memory, local_processes
from distgan.runtime.files import write_json_atomically, write_text_atomically


class ImageFormat(NamedTuple):
    """An image format that DALI decodes, and the file extensions that name it."""

    name: str  # as the start-up line counts it
    pillow: str  # Pillow's name for it (the scan opens files with Pillow)
    extensions: tuple[str, ...]


# Every format DALI's image decoder reads, each checked to decode on the CPU (tests/data/).
# Files are found by extension; DALI decodes by content, and the scan checks that.
IMAGE_FORMATS = (
    ImageFormat("JPEG", "JPEG", (".jpg", ".jpeg")),
    ImageFormat("PNG", "PNG", (".png",)),
    ImageFormat("WebP", "WEBP", (".webp",)),
    ImageFormat("BMP", "BMP", (".bmp",)),
    ImageFormat("TIFF", "TIFF", (".tif", ".tiff")),
    ImageFormat("PNM", "PPM", (".pbm", ".pgm", ".ppm", ".pnm")),
    ImageFormat("JPEG 2000", "JPEG2000", (".jp2", ".j2k")),
)
FORMAT_BY_EXTENSION = {ext: f for f in IMAGE_FORMATS for ext in f.extensions}
IMAGE_EXTENSIONS = tuple(FORMAT_BY_EXTENSION)
FORMAT_NAMES = ", ".join(f.name for f in IMAGE_FORMATS)
PILLOW_FORMATS = frozenset(f.pillow for f in IMAGE_FORMATS)
TIFF_BITS_PER_SAMPLE = 258  # the TIFF tag
SKIPPED_NAMES_SHOWN = 5  # names of skipped files on the start-up line; then "and N more"
SCAN_VERSION = 2  # 2: every format in IMAGE_FORMATS
BAD_IMAGES_FILE = "bad_images.txt"
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # PIL's
HEADERS_PER_ROUND = 256  # files whose headers are read between checks for a colour image
# DALI decodes JPEG 2000 on the CPU with OpenCV, which warns on every image of a bare codestream
# (.j2k: no colour space box, sRGB assumed), each epoch: keep its warnings out of the log.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


class ImageFolder(NamedTuple):
    """What a data folder holds: its image files (by extension), sorted absolute paths, and the
    other files in it, which training skips (sorted, relative to the folder)."""

    root: Path
    files: list[str]
    skipped: list[str]

    def describe(self, files: list[str] | None = None) -> str:
        """`files` (default: all the images) counted by format, and the skipped files named:
        "22 images (13 JPEG, 4 WebP, 4 BMP, 1 PNG) in DIR; skipped 2 files without an image
        extension: notes.txt, thumbs.db"."""
        files = self.files if files is None else files
        counts = Counter(FORMAT_BY_EXTENSION[Path(f).suffix.lower()].name for f in files)
        order = [f.name for f in IMAGE_FORMATS]
        by_count = sorted(counts.items(), key=lambda item: (-item[1], order.index(item[0])))
        formats = ", ".join(f"{count} {name}" for name, count in by_count)
        text = f"{len(files)} images ({formats}) in {self.root}"
        if self.skipped:
            names = ", ".join(self.skipped[:SKIPPED_NAMES_SHOWN])
            more = len(self.skipped) - SKIPPED_NAMES_SHOWN
            names += f", and {more} more" if more > 0 else ""
            text += f"; skipped {plural(len(self.skipped), 'file')} without an image extension: "
            text += names
        return text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def survey_folder(data_dir: str | os.PathLike) -> ImageFolder:
    """The image files under `data_dir` (recursively; any extension of IMAGE_FORMATS, in any
    case) and the other files there. Raises with a one-line message if there are no images."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist: check the --data-dir path")
    if not root.is_dir():
        raise NotADirectoryError(f"data_dir {root} is not a folder: pass the folder of images")
    files, skipped = [], []
    for path in root.rglob("*"):
        if path.suffix.lower() in FORMAT_BY_EXTENSION and path.is_file():
            files.append(str(path.resolve()))
        elif not path.is_dir():  # other files, and broken links
            skipped.append(str(path.relative_to(root)))
    folder = ImageFolder(root, sorted(files), sorted(skipped))
    if not files:
        others = f" ({plural(len(skipped), 'other file')})" if skipped else ""
        raise ValueError(
            f"data_dir {root} holds no images{others}: point --data-dir at a folder of "
            f"{FORMAT_NAMES} files ({' '.join(IMAGE_EXTENSIONS)})"
        )
    return folder


def find_images(data_dir: str | os.PathLike) -> list[str]:
    """All image files under `data_dir` (recursively), sorted, as absolute paths."""
    return survey_folder(data_dir).files


def dali_cannot_decode(image: Image.Image) -> str | None:
    """Why DALI cannot decode an image that Pillow opened (its format, or a TIFF variant that
    DALI 2.4 fails on or decodes wrongly on the CPU), or None."""
    if image.format not in PILLOW_FORMATS:
        return f"a {image.format} image, which DALI does not decode: convert it to PNG"
    if image.format != "TIFF":
        return None
    if TIFF_BITS_PER_SAMPLE not in image.tag_v2:  # Pillow's uncompressed 1-bit TIFFs
        return "a TIFF without a BitsPerSample tag, which DALI cannot decode: convert it to PNG"
    if image.mode == "I":
        return "a 32-bit integer TIFF, which DALI cannot decode: convert it to PNG"
    if image.mode == "LA":
        return "a gray + alpha TIFF, which DALI decodes with wrong colours: convert it to PNG"
    return None


def check_image(path: str, crop_box: list[int] | None = None) -> str | None:
    """Why DALI could not train on this file, or None if it can. Decodes the whole file (JPEGs at
    1/8 scale: every byte is still entropy-decoded, so truncation and corruption show)."""
    try:
        with open(path, "rb") as f:
            header = f.read(1)
        if not header:
            return "empty file"
        with Image.open(path) as image:
            reason = dali_cannot_decode(image)
            if reason:
                return reason
            size = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except PermissionError:
        return "unreadable: permission denied"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken data
        return f"corrupt: {first_line(err, 80)}"
    if crop_box is not None:
        left, top, width, height = crop_box
        if left + width > size[0] or top + height > size[1]:
            return f"{size[0]}x{size[1]} is smaller than the crop box {crop_box}"
    return None


def scan_cache_path(
    cache_dir: str | os.PathLike, files: list[str], crop_box, part: str = ""
) -> Path:
    """Where scan results for this data (and crop, and share of it) are kept."""
    root = os.path.commonpath(files) if files else ""
    blob = json.dumps([SCAN_VERSION, root, len(files), crop_box, part])
    return Path(cache_dir) / "scans" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def scan_images(
    files: list[str],
    crop_box: list[int] | None = None,
    workers: int | None = None,
    cache_path: Path | None = None,
) -> dict[str, str]:
    """{path: reason} for every file in `files` that training cannot use, checked in parallel.

    With `cache_path`, results are kept per file (size and mtime), so a later scan of the same
    data only re-checks new or changed files.
    """
    known: dict = {}
    if cache_path is not None and cache_path.is_file():
        try:
            known = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}

    def stamp(path: str):
        try:
            info = os.stat(path)
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return None

    stamps = {f: stamp(f) for f in files}
    todo = [f for f in files if f not in known or known[f][0] != stamps[f] or stamps[f] is None]
    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        for path, reason in zip(
            todo, pool.map(lambda f: check_image(f, crop_box), todo), strict=True
        ):
            known[path] = [stamps[path], reason]
    if cache_path is not None and todo:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(cache_path, {f: known[f] for f in files})
    return {f: known[f][1] for f in files if known[f][1] is not None}


def _all_processes(found: dict) -> dict:
    """The union of every training process's dict (just `found` without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return found
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, found)
    return {key: value for part in parts for key, value in part.items()}


def prepare_images(accelerator, dc, resolution: int, out_dir: Path) -> tuple[Path, list[str]]:
    """(data folder, usable image files), the same on every process. Renders the built-in faces
    once per machine; scans the files for ones DALI cannot decode (each process a share, in
    parallel) and stops with the list, or skips them, as `dc.on_bad_image` says; prints the
    images it trains on by format, and the other files it skipped.

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

    files = folder.files
    rank, world = accelerator.process_index, accelerator.num_processes
    cache_dir = dc.cache_dir or default_cache_dir()
    cache = scan_cache_path(cache_dir, files, dc.crop_box, f"{rank}of{world}")
    workers = max(1, available_cpus() // local_processes())
    found = scan_images(files[rank::world], dc.crop_box, workers=workers, cache_path=cache)
    bad = _all_processes(found)
    if bad:
        files = _without_bad_images(accelerator, dc.on_bad_image, folder, bad, out_dir)
    accelerator.print(f"data: {folder.describe(files)}")
    return Path(data_dir), files


def _without_bad_images(accelerator, on_bad_image: str, folder: ImageFolder, bad, out_dir):
    """The usable files once the `bad` ones ({path: reason}) are listed in OUT/bad_images.txt,
    or a UserError naming them (on_bad_image "error", or none left)."""
    files, data_dir = folder.files, folder.root
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


def is_grayscale(path: str) -> bool:
    """Whether a file holds a grayscale image, from its header alone (PIL decodes no pixels)."""
    try:
        with Image.open(path) as image:
            return image.mode in GRAY_MODES
    except (OSError, SyntaxError, ValueError):  # the scan has named any bad file already
        return False


def count_channels(files: list[str], workers: int | None = None) -> int:
    """1 if every file is a grayscale image, else 3. Headers only, read in parallel; it stops at
    the first colour image, so colour data costs a few reads."""
    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        for start in range(0, len(files), HEADERS_PER_ROUND):
            if not all(pool.map(is_grayscale, files[start : start + HEADERS_PER_ROUND])):
                return 3
    return 1


def _from_main_process(value):
    """The main process's `value` on every process (`value` itself without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def resolve_channels(accelerator, requested: str, files: list[str]) -> int:
    """The channel count to train on, the same on every process: `requested` ("1" or "3"), or
    for "auto" 1 when every image in `files` is grayscale, else 3 (read by the main process)."""
    if requested != "auto":
        return int(requested)
    found = count_channels(files) if accelerator.is_main_process else None
    return _from_main_process(found)


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
    ):
        """`shard_id` is the global rank; `device_id` the local CUDA device, or None for CPU."""
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

    @classmethod
    def for_run(cls, files: list[str], cfg, accelerator) -> ImageLoader:
        """The loader of one training process: `cfg` is the run's Config, `accelerator` its
        Accelerator (the shard is the global rank; decoding on the process's GPU, if any)."""
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
        )

    def _pipeline(self, files: list[str], flips: np.ndarray | None, seed: int, shard: tuple):
        """DALI: read `files` (shard `shard` = (id, count)), decode, crop, resize, flip by `flips`
        and normalise to float; without `flips`, no flip and uint8 out (for the cache)."""
        batch_size = self.batch_size
        placement = {"num_threads": self.num_threads, "device_id": self.device_id}

        @pipeline_def(batch_size=batch_size, seed=seed, **placement)
        def image_pipeline():
            # Plain reads, not mmap: +15% on small JPEGs here, and what network file systems want.
            reading = {"random_shuffle": False, "dont_use_mmap": True, "name": "Reader"}
            encoded, _ = fn.readers.file(
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
            return fn.crop_mirror_normalize(
                images, mirror=mirror, dtype=types.FLOAT, output_layout="HWC", **to_unit
            )

        return image_pipeline()

    def _run(self, pipe) -> Iterator[torch.Tensor]:
        pipe.build()
        iterator = DALIGenericIterator(
            pipe, ["images"], reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL
        )
        try:
            for batch in iterator:
                yield batch[0]["images"]
        finally:
            del iterator, pipe

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from `start_step` on (a resumed epoch skips what it has seen).

        Each yielded tensor may be a reused buffer: clone it to keep it past the next batch.
        """
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is not in [0, {self.steps_per_epoch})")
        if self.cache_planned:
            self.build_cache()
        if self.cache is not None:
            yield from self._cached_epoch(epoch, start_step)
            return
        global_batch = self.num_shards * self.batch_size
        order = epoch_order(len(self.files), epoch, self.seed, global_batch)
        flips = epoch_flips(len(order), epoch, self.seed)
        layout = shard_layout(order, self.num_shards, self.batch_size, start_step)
        files = [self.files[i] for i in layout]
        shard = (self.shard_id, self.num_shards)
        seed = self.seed * 1000 + epoch
        pipe = self._pipeline(files, self._share(flips, start_step), seed, shard)
        for images in self._run(pipe):
            yield images.permute(0, 3, 1, 2)  # NHWC in memory, NCHW to the model

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
        for images in self._run(self._pipeline(self.files, None, self.seed, (0, 1))):
            cache[filled : filled + images.shape[0]].copy_(images)
            filled += images.shape[0]
        self.cache = cache
        return cache

    def _cached_epoch(self, epoch: int, start_step: int) -> Iterator[torch.Tensor]:
        """The streaming pipeline's batches, cut from the cache: indices and flips go to the
        device once per epoch, so a batch costs no host-device sync."""
        global_batch = self.num_shards * self.batch_size
        order = epoch_order(len(self.files), epoch, self.seed, global_batch)
        cache = self.cache
        indices = torch.from_numpy(self._share(order, start_step)).to(cache.device)
        if self.flip:
            flips = self._share(epoch_flips(len(order), epoch, self.seed), start_step)
            mirrored = torch.from_numpy(flips.astype(bool)).to(self.device)
        # DALI normalises as (x - mean) * (1 / std) in float32: the same here, so bitwise equal.
        scale = torch.tensor(1 / 127.5, dtype=torch.float32, device=self.device)
        staged = cache.device != self.device  # a host cache feeding a GPU
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
            yield images.permute(0, 3, 1, 2).float().sub_(127.5).mul_(scale)

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
