"""The labels of conditional models, torch-free (numpy only): what `--class` asks for, the rows
of a grid with one row per class, and the arrays fed to the model's `label` input.

A model's metadata says its `conditioning` ("none", "class" or "attributes") and its `classes`
(the class or attribute names, in label order). Its `label` input takes, for "class", int64
class indices [B]; for "attributes", float32 multi-hot vectors [B, K] (1 = the attribute on).

`--class` takes a class by name, else by index (`--class 7`); for attributes, the names (or
indices) of those switched on, comma-separated (`--class Smiling,Male`; `none` for none); and
`all`: one row per class, or per attribute combination, as the training sample grids
(distgan.config.model.grid_rows, torch-free, shared with training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distgan.config.model import NO_ATTRIBUTES
from distgan.config.model import grid_rows as model_grid_rows  # torch-free
from distgan.errors import UserError

CONDITIONINGS = ("none", "class", "attributes")
ALL = "all"


@dataclass(frozen=True)
class LabelRow:
    """One label to generate with: its name (a class, or attributes joined by " + ") and the
    label of one image (an int64 scalar, or a float32 [K] multi-hot vector)."""

    name: str
    label: np.ndarray

    def batch(self, count: int) -> np.ndarray:
        """The label for `count` images: int64 [count] or float32 [count, K]."""
        return np.repeat(self.label[None], count, axis=0)


def class_row(classes, index: int) -> LabelRow:
    return LabelRow(classes[index], np.array(index, dtype=np.int64))


def attribute_row(classes, on) -> LabelRow:
    """The row of the attributes `on` (a flag per attribute)."""
    label = np.array([float(bool(flag)) for flag in on], dtype=np.float32)
    names = [name for name, flag in zip(classes, label, strict=True) if flag]
    return LabelRow(" + ".join(names) or NO_ATTRIBUTES, label)


def grid_rows(conditioning: str, classes) -> list[LabelRow]:
    """The rows of the training sample grids (distgan.config.model.grid_rows), as LabelRows."""
    rows = model_grid_rows(conditioning, list(classes))
    if conditioning == "class":
        return [class_row(classes, index) for _, index in rows]
    return [attribute_row(classes, combo) for _, combo in rows]


def listed(classes) -> str:
    return ", ".join(classes)


def find_class(name: str, classes) -> int | None:
    """The index of class `name`: by name first, then as an index; None if it is neither."""
    if name in classes:
        return list(classes).index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    return None


def select_labels(spec: str | None, conditioning: str, classes) -> list[LabelRow] | None:
    """The rows `--class spec` asks for (one, or all of grid_rows for `all`); None for an
    unconditional model without --class. One-line errors for a missing, unknown or unwanted
    --class."""
    classes = list(classes)
    if conditioning == "none":
        if spec is not None:
            raise UserError(
                f"--class {spec}: this model is unconditional (it has no classes): drop --class"
            )
        return None
    what = "classes" if conditioning == "class" else "attributes"
    if spec is None:
        example = "NAME" if conditioning == "class" else "NAME,NAME"
        raise UserError(
            f"this model is conditional on {len(classes)} {what} ({listed(classes)}): choose "
            f"with --class {example} (or --class {ALL} for a grid with one row per "
            f"{'class' if conditioning == 'class' else 'combination'})"
        )
    spec = spec.strip()
    if spec == ALL:
        return grid_rows(conditioning, classes)
    if conditioning == "class":
        index = find_class(spec, classes)
        if index is None:
            raise UserError(
                f"--class {spec!r} is not one of the model's classes ({listed(classes)}): give "
                f"a name, an index 0 .. {len(classes) - 1}, or {ALL}"
            )
        return [class_row(classes, index)]
    if spec == NO_ATTRIBUTES and NO_ATTRIBUTES not in classes:
        return [attribute_row(classes, [0] * len(classes))]
    on = [0] * len(classes)
    for part in spec.split(","):
        index = find_class(part.strip(), classes)
        if index is None:
            raise UserError(
                f"--class {spec!r}: {part.strip()!r} is not one of the model's attributes "
                f"({listed(classes)}): give those to switch on, comma-separated (names or "
                f"indices 0 .. {len(classes) - 1}), {NO_ATTRIBUTES}, or {ALL}"
            )
        on[index] = 1
    return [attribute_row(classes, on)]


def check_labels(conditioning: str, num_classes: int, batch: int) -> np.ndarray | None:
    """Labels for checking an export at `batch`, the same every time: classes 0, 1, ... in turn
    (every class, where the batch has room); attributes on or off at random (seeded by batch)."""
    if conditioning == "none":
        return None
    if conditioning == "class":
        return np.arange(batch, dtype=np.int64) % num_classes
    rng = np.random.default_rng(batch)
    return (rng.random((batch, num_classes)) < 0.5).astype(np.float32)
