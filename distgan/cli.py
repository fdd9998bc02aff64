"""`distgan COMMAND [ARGS]`: every distgan command behind one name.

Each command is the module's own: ARGS go to it unchanged, so `distgan train --help` is the
trainer's help and `distgan generate ...` is `python -m export generate ...`. A command's module
is imported only when it runs: `distgan --help` imports no torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from distgan import __version__
from distgan.errors import UserError, exit_on_user_error


class Command(NamedTuple):
    module: str  # its `main(argv)` runs the command
    summary: str  # one line for `distgan --help`
    prefix: tuple[str, ...] = ()  # arguments put before the user's (a subcommand of the module's)


COMMANDS = {
    "train": Command(
        "distgan.training.cli",
        "train a GAN in this process (several: `distgan launch launch/train.py ...`)",
    ),
    "evaluate": Command(
        "distgan.metrics.evaluate", "FID and KID of a trained generator or an ONNX model"
    ),
    "hub": Command(
        "distgan.outputs.hub", "save a run's Hugging Face model folder, or push it to the Hub"
    ),
    "data": Command("distgan.data.loader", "`data scan DIR`: list the images training cannot use"),
    "env": Command(
        "distgan.runtime.env", "what this machine gives training: CPUs, memory, GPUs, builds"
    ),
    "launch": Command(
        "distgan.runtime.launcher", "`accelerate launch`, made safe to stop (= distgan-launch)"
    ),
    "export": Command("export.__main__", "`export onnx|generate|bench`: ONNX export and runs"),
    "generate": Command(
        "export.__main__", "write images with an exported ONNX model (no torch)", ("generate",)
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: distgan COMMAND [ARGS]   (distgan COMMAND --help: the command's options)"]
    lines += ["", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def find(name: str) -> Command:
    """The command called `name`, or a one-line UserError naming the choices."""
    if name in COMMANDS:
        return COMMANDS[name]
    import difflib  # only on this error

    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(
        f"unknown command {name!r}{hint}: use one of {', '.join(COMMANDS)} (distgan --help)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"distgan {__version__}")
        return
    with exit_on_user_error():
        command = find(argv[0])
    module = importlib.import_module(command.module)
    module.main([*command.prefix, *argv[1:]])


if __name__ == "__main__":
    main()
