"""Where a run starts: the checkpoint it resumes from, decided by the main process alone (with the
run's lock held: distgan/outputs/runlock.py) and followed by every process (`main_decides`,
runtime/agree.py).

--resume auto resumes from the newest intact checkpoint. One whose trainer_state.json cannot be
read, or whose files differ from their checksums (outputs/checksums.py), is damaged: it is moved
aside as checkpoints/damaged-step-N (kept, never resumed from, never pruned), and a note says
which checkpoint the run resumes from instead, and why: a requeued job has nobody to pass
--resume. --resume PATH resumes from that checkpoint, and fails with one line if it is damaged.
"""

from __future__ import annotations

from pathlib import Path

from distgan.errors import UserError
from distgan.outputs.checkpoint import (
    DAMAGED_FIX,
    list_checkpoints,
    parse_trainer_state,
    read_trainer_state,
)
from distgan.outputs.checksums import Damaged, verify_checksums

DAMAGED_PREFIX = "damaged-"


def inspect_checkpoint(path: Path) -> bool:
    """True if the checkpoint at `path` is verified intact, False if it predates checksums
    (its state still readable); Damaged naming the first problem found."""
    parse_trainer_state(path)
    return verify_checksums(path)


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the step-* folders, keeping it; its new path."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    copies = 1
    while target.exists():
        copies += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{copies}")
    path.rename(target)
    return target


def find_resume_point(resume: str, checkpoints_root: Path, say=print) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh run (main process: it moves
    damaged checkpoints aside and prints why with `say`)."""
    if resume == "none":
        existing = list_checkpoints(checkpoints_root)
        if existing:
            raise UserError(
                f"{checkpoints_root.parent} already holds a run (checkpoints up to "
                f"{existing[-1].name}): continue it with --resume auto, or pick a new --out-dir"
            )
        return None
    if resume != "auto":
        path = Path(resume)
        read_trainer_state(path)  # a checkpoint at all, its state readable: else one line
        try:
            verified = verify_checksums(path)
        except Damaged as err:
            raise UserError(f"checkpoint {path} is damaged ({err}): {DAMAGED_FIX}") from None
        if not verified:
            say(f"note: {path} predates checksums: resuming from it unverified")
        return path
    damaged = []
    for path in reversed(list_checkpoints(checkpoints_root)):
        try:
            verified = inspect_checkpoint(path)
        except Damaged as err:
            damaged.append((path, str(err)))
            continue
        for bad, why in damaged:
            kept = set_aside(bad)
            say(
                f"note: checkpoint {bad.name} is damaged ({why}); kept as {kept.name}, resuming "
                f"from {path.name}, the newest intact checkpoint"
            )
        if not verified:
            say(f"note: {path.name} predates checksums: resuming from it unverified")
        return path
    if damaged:
        newest, why = damaged[0]
        raise UserError(
            f"no intact checkpoint in {checkpoints_root} to resume from (the newest, "
            f"{newest.name}, is damaged: {why}): start a new run (--resume none with a new "
            "--out-dir)"
        )
    return None
