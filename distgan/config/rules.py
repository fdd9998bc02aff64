"""A config field's rules sit beside the field, in its dataclass metadata (`setting`): whether it
must be > 0, whether a resumed run may change it, and what a config.toml written before the field
existed trained with. The checks and lists that need them read them from there."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

OnResume = Literal["may change", "fixed", "not compared"]
"""may change: a resumed run takes the new value (steps, learning rates, cadences, speed); fixed:
what the run has learnt, from which data and how, so a new value is refused; not compared: where
the run is and how it was found (out_dir, resume)."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    positive: bool = False,
    on_resume: OnResume = "may change",
    before_it: Any = dataclasses.MISSING,
    resolved: bool = False,
) -> Any:
    """A config field with its rules. `positive`: a finite number > 0 (None allowed where the
    type allows it). `on_resume`: see OnResume. `before_it`: the value a run saved without this
    field trained with, where that is not the default. `resolved`: set by training, not by a
    flag or file (the model's channels, from the data's)."""
    metadata = {"positive": positive, "on_resume": on_resume, "resolved": resolved}
    if before_it is not dataclasses.MISSING:
        metadata["before_it"] = before_it
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def on_resume(f: dataclasses.Field) -> OnResume:
    return f.metadata.get("on_resume", "may change")


def is_resolved(f: dataclasses.Field) -> bool:
    return f.metadata.get("resolved", False)


def base_type(hint) -> tuple[type, bool]:
    """(the type a flag parses, whether None is allowed) for hints like `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def choices(hint) -> tuple | None:
    """The allowed values of a Literal[...] field (also inside `X | None`), else None."""
    base, _ = base_type(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def check_fields(obj) -> None:
    """Every field marked positive holds a finite number > 0 (or None), and every Literal field
    one of its values: ValueError naming the field and what is allowed."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        positive = f.metadata.get("positive") and value is not None
        if positive and (isinstance(value, bool) or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{f.name}={value!r} is not allowed: use a finite number > 0")
        allowed = choices(hints[f.name])
        if allowed and value not in allowed and value is not None:
            listed = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
            raise ValueError(f"{f.name}={value!r} is not allowed: use {listed}")
