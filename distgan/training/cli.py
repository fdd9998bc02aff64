"""`distgan train` and `python launch/train.py`: the command line is read before torch loads, so
that --help and a mistyped flag answer at once; then the trainer runs, and its outcome becomes
the exit code."""

from __future__ import annotations

import os
import sys

from distgan.config.flags import parse_args
from distgan.errors import RunStopped, exit_on_user_error
from distgan.runtime.collector import collector_paused


def main(argv: list[str] | None = None) -> None:
    try:
        with exit_on_user_error():
            cfg = parse_args(argv)
            with collector_paused():
                import torch._dynamo  # noqa: F401  (the first optimizer imports it otherwise)

                from distgan.training.stop import Faults
                from distgan.training.trainer import train  # torch, DALI and Accelerate load

            train(cfg, Faults.from_env())
    except RunStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once, without a checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # Name the process: under a launcher the first failure is the one that matters, and the
        # launcher then stops the other processes (or they time out of their next collective).
        rank = os.environ.get("RANK", "0")
        message = f"error: process {rank} failed: {type(err).__name__}: {err}"
        print(message, file=sys.stderr, flush=True)
        raise
