"""Decisions every process follows: the main process decides (reads a file, clusters the images,
picks the checkpoint), and the others receive the outcome, errors included, so that every
process takes the same path and a failure on the main process ends them all rather than leaving
them waiting. Plain torch.distributed: the data code uses it before the training loop exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed

from distgan.errors import UserError

T = TypeVar("T")


def broadcast_object_list(objects: list) -> list:
    """`objects` as the main process holds them, on every process (in place); as they are
    without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(objects, src=0)
    return objects


def from_main_process(value):
    """The main process's `value` on every process."""
    return broadcast_object_list([value])[0]


def main_decides(processes, decide: Callable[[], T]) -> T:
    """What `decide()` returns on the main process, on every process (`processes`: anything with
    Accelerate's is_main_process and num_processes). A UserError it raises is raised on every
    process, so that all stop together; any other error on the main process (KeyboardInterrupt
    included) ends the others too, naming it, and is raised there."""
    outcome: list = [None, None]
    if processes.is_main_process:
        try:
            outcome = [decide(), None]
        except UserError as err:
            outcome = [None, ("user", str(err))]
        except BaseException as err:
            outcome = [None, ("other", f"{type(err).__name__}: {err}")]
            if processes.num_processes > 1:
                broadcast_object_list(outcome)  # else the others wait until the timeout
            raise
    if processes.num_processes > 1:
        broadcast_object_list(outcome)
    result, error = outcome
    if error is None:
        return result
    kind, message = error
    if kind == "user":
        raise UserError(message)
    raise RuntimeError(f"the main process failed: {message}")
