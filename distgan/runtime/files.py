"""Files written so that a crash never leaves a half-written one: write a temporary sibling, fsync,
rename. Imports no torch: `python -m export generate` may use it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Call `write(tmp)` to write a temporary file next to `path`, then fsync it and rename it
    over `path`, so readers see the old file or the whole new one, never a part. Returns what
    `write` returns (a writer may check its file before it is moved into place).

    The temporary name keeps `path`'s suffix (`.g.onnx.tmp-PID.onnx`): writers that pick the
    format from the extension (or append one, as numpy does) still work. If `write` or the rename
    fails, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        result = write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one step."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, data, indent: int | None = None) -> None:
    """Replace `path` with `data` as JSON in one step (`indent` as for `json.dumps`)."""
    write_text_atomically(path, json.dumps(data, indent=indent))
