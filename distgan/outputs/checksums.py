"""Checksums of a checkpoint's files, written when it is saved and verified before a run resumes
from it, so that "intact" means every file is as it was written: a truncated or altered file is
found before anything loads it. Checkpoints saved before checksums have no checksums.json; they
are resumed from unverified. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distgan.runtime.files import write_json_atomically

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "sha256"


class Damaged(ValueError):
    """A checkpoint file is not as it was written; the message names the file and the damage."""


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (also the Hub model folder's manifest: hub.py)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def write_checksums(folder: str | Path) -> None:
    """Write `folder`/checksums.json: the size and SHA-256 of every other file in it."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {
            "bytes": path.stat().st_size,
            ALGORITHM: sha256_of(path),
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }
    write_json_atomically(folder / CHECKSUMS_FILE, {"files": files}, indent=2)


def verify_checksums(folder: str | Path) -> bool:
    """True if every file listed in `folder`/checksums.json has its size and SHA-256; False if
    there is no checksums.json (saved before checksums); else Damaged, naming the first file
    that differs."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / CHECKSUMS_FILE).read_text())["files"]
        expected = {
            name: (int(entry["bytes"]), str(entry[ALGORITHM])) for name, entry in listed.items()
        }
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise Damaged(f"{CHECKSUMS_FILE} is unreadable ({type(err).__name__}: {err})") from None
    for name, (size, digest) in expected.items():
        path = folder / name
        try:
            actual = path.stat().st_size
            matches = actual == size and sha256_of(path) == digest
        except FileNotFoundError:
            raise Damaged(f"{name} is missing") from None
        except OSError as err:
            raise Damaged(f"{name} cannot be read ({err.strerror or err})") from None
        if actual < size:
            raise Damaged(f"{name} is truncated ({actual} of {size} bytes)")
        if actual != size:
            raise Damaged(f"{name} has {actual} bytes, not the {size} written")
        if not matches:
            raise Damaged(
                f"{name} does not match its {ALGORITHM} checksum (altered since it was written)"
            )
    return True
