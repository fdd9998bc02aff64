"""A folder of training images, checked before any training: the image formats DALI's decoder
reads (JPEG, PNG, WebP, BMP, TIFF, PNM, JPEG 2000), the survey of a folder (its images by
extension, the other files it skips), the check that DALI can decode each file (the scan, cached
per file) and whether every image is grayscale (from the headers).

Imports no torch and no DALI: Pillow reads the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from distgan.errors import first_line
from distgan.runtime.env import available_cpus
from distgan.runtime.files import write_json_atomically


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
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # PIL's
HEADERS_PER_ROUND = 256  # files whose headers are read between checks for a colour image


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
    absolute = root.resolve()  # once: resolving each file costs more than the walk
    for path in root.rglob("*"):
        if path.suffix.lower() in FORMAT_BY_EXTENSION and path.is_file():
            files.append(str(absolute / path.relative_to(root)))
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
