"""Errors for bad input and stopped runs, and the checks shared by the entry points. Imports no
torch: `python -m export generate` uses it too."""

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


class UserError(ValueError):
    """A problem with what the user gave us; the message names it and the fix, on one line.

    Entry points print it without a traceback and exit with status 2.
    """


class RunStopped(Exception):
    """Training cannot usefully go on (its losses stay non-finite); the message says which
    checkpoint is good and what to change. Entry points print it and exit with status 3."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of `err`'s message, cut to `limit` characters, for a one-line error; the
    exception's type name when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


@contextlib.contextmanager
def exit_on_user_error(*kinds: type[BaseException]) -> Iterator[None]:
    """The one place a command's error becomes its exit status: an error of `kinds` (default
    UserError) raised in the block prints `error: MESSAGE` on stderr and exits with status 2,
    without a traceback; anything else passes through. Use it around a main's work,

        with exit_on_user_error():
            run(args)

    or as a decorator, `@exit_on_user_error()`.
    """
    caught = kinds or (UserError,)
    try:
        yield
    except caught as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def require_writable_dir(path: Path, name: str) -> None:
    """Create `path` if needed and prove it writable, or fail before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to {name} {path} ({err.strerror or err}): pick another --out-dir"
        ) from None
