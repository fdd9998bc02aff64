"""What the `accelerate launch` that started this process was asked about mixed precision, so that
`--mixed-precision auto` follows the launcher's choice when there was one, and only then.

Accelerate exports ACCELERATE_MIXED_PRECISION=no to its trainers both when the user chose `no` and
when nothing was chosen. The choice itself is in the launcher's command line (`--mixed_precision
X`) and in the Accelerate config file it read (its `--config_file`, else `default_config.yaml`
under HF_HOME). The launcher is an ancestor of every trainer (under distgan-launch too), so its
command line is read with psutil and parsed with Accelerate's own parser, and its config file
loaded with Accelerate's own loader: what they find is what the launcher did.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import psutil
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from distgan.errors import UserError

EXPORTED = "ACCELERATE_MIXED_PRECISION"  # what the launcher passes on to its trainers
TRAINS_IN = ("no", "fp16", "bf16")  # what distgan trains in; not Accelerate's fp8


class LauncherPrecision(NamedTuple):
    """The mixed precision `accelerate launch` was given, if it was."""

    choice: str | None
    """"no", "fp16", "bf16" or "fp8" where one was chosen; None where none was (or no launcher)."""

    source: str
    """Where the choice was made, e.g. "accelerate launch --mixed_precision no"; without a choice,
    what the launcher's `no` is ("" without a launcher), for the start-up line."""

    def for_auto(self) -> str:
        """The choice, for `--mixed-precision auto` to follow; a one-line error for one distgan
        does not train in (fp8: Accelerate would fail with a traceback, or train untested)."""
        if self.choice not in TRAINS_IN:
            raise UserError(
                f"mixed precision {self.choice!r} ({self.source}) is not one distgan trains in: "
                "leave it out of the launcher (auto then picks by the hardware), or pass "
                "--mixed-precision bf16, fp16 or no"
            )
        return self.choice


def launch_arguments(argv: list[str]) -> list[str] | None:
    """The arguments of an `accelerate launch` command line (console script or `python -m`), or
    None if `argv` is not one."""
    for index, token in enumerate(argv):
        rest = argv[index + 1 :]
        if token in ("accelerate.commands.launch", "accelerate-launch") or token.endswith(
            "/accelerate-launch"
        ):
            return rest
        is_cli = token == "accelerate.commands.accelerate_cli" or os.path.basename(token) == (
            "accelerate"
        )
        if is_cli and rest[:1] == ["launch"]:
            return rest[1:]
    return None


def nearest_launch_arguments() -> list[str] | None:
    """The arguments of the nearest `accelerate launch` among this process's ancestors, or None
    if there is none (or it cannot be read)."""
    with contextlib.suppress(psutil.Error):
        for ancestor in psutil.Process().parents():
            with contextlib.suppress(psutil.Error):
                arguments = launch_arguments(ancestor.cmdline())
                if arguments is not None:
                    return arguments
    return None


def default_config_file(environ: Mapping[str, str]) -> Path:
    """The config file `accelerate launch` reads when given none, as Accelerate 1.x finds it
    (accelerate/commands/config/config_args.py): HF_HOME/accelerate/default_config.yaml, with
    HF_HOME defaulting to XDG_CACHE_HOME/huggingface, and that to ~/.cache/huggingface."""
    cache = environ.get("XDG_CACHE_HOME", "~/.cache")
    home = environ.get("HF_HOME", os.path.join(cache, "huggingface"))
    return Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"


def _parse(arguments: list[str]):
    """`accelerate launch`'s options, parsed by Accelerate's parser, or None if it refuses them."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return launch_command_parser().parse_args(arguments)
    except SystemExit:
        return None


def _config_choice(path: Path) -> str | None:
    """The mixed_precision an Accelerate config file sets (or its older `fp16: true`), or None."""
    try:
        choice = load_config_from_file(str(path)).mixed_precision
    except Exception:  # noqa: BLE001  the launcher read it, or it would not have started us
        return None
    return choice if isinstance(choice, str) else None  # unquoted YAML `no` is False


def launcher_precision(
    environ: Mapping[str, str] | None = None, arguments: list[str] | None = None
) -> LauncherPrecision:
    """What the launcher of this process chose, from `environ` (default os.environ) and its
    command line `arguments` (default: read from the nearest `accelerate launch` ancestor)."""
    environ = os.environ if environ is None else environ
    exported = environ.get(EXPORTED)
    if exported is None:  # not started by accelerate launch
        return LauncherPrecision(None, "")
    arguments = nearest_launch_arguments() if arguments is None else arguments
    options = None if arguments is None else _parse(arguments)
    if options is not None and options.mixed_precision:
        flag = f"accelerate launch --mixed_precision {options.mixed_precision}"
        return LauncherPrecision(options.mixed_precision, flag)
    if options is not None:
        # As accelerate launch does: --config_file, else the default file unless --cpu.
        config = options.config_file or default_config_file(environ)
        read = options.config_file is not None or (Path(config).is_file() and not options.cpu)
        choice = _config_choice(Path(config)) if read else None
        if choice is not None:
            return LauncherPrecision(choice, f"mixed_precision {choice!r} in {config}")
    if exported != "no":  # the launcher defaults to nothing else: this was chosen
        return LauncherPrecision(exported, f"{EXPORTED}={exported}")
    if options is None:
        return LauncherPrecision(None, f"{EXPORTED}=no, which may be the launcher's default")
    return LauncherPrecision(None, "accelerate launch's default no")
