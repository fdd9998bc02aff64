"""Labels for conditional training, read before any work: the class of each image from its
subfolder (`--labels folders`, the ImageFolder layout), from a CSV of `file,class` rows, or
attributes from CelebA's list_attr_celeba.txt (`--attributes`). Torch-free: the loader turns the
values into a tensor.

Every problem is a one-line UserError naming it and the fix: an image without a label (unless
`--on-unlabelled skip`), a class without images, a label file naming files that are not there.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distgan.config.model import ModelConfig
from distgan.data.folder import plural
from distgan.errors import UserError

CSV_HEADER = ("file", "class")


@dataclass(kw_only=True)
class Labels:
    """The labels of a run's images, aligned with `files`."""

    conditioning: str
    """"class" (one class per image) or "attributes" (any subset of `classes`, multi-hot)."""

    classes: list[str]
    """The class (or attribute) names, in label order."""

    files: list[str]
    """The labelled images, in the order of the run's files (unlabelled ones skipped)."""

    values: list
    """Per file: its class index (class), or a list of 0/1 per attribute (attributes)."""

    clustered: bool = False
    """The classes are k-means clusters of the images (--clusters, data/clusters.py), not labels:
    the model is self-conditioned on them (ModelConfig.cluster_shares)."""

    def only(self, files: list[str]) -> Labels:
        """These labels for those of `files` they cover (after unusable images are skipped),
        checked again for classes left without images."""
        keep = set(files)
        rows = [(f, v) for f, v in zip(self.files, self.values, strict=True) if f in keep]
        kept = Labels(
            conditioning=self.conditioning,
            classes=self.classes,
            files=[f for f, _ in rows],
            values=[v for _, v in rows],
            clustered=self.clustered,
        )
        kept.require_images_in_every_class()
        return kept

    def require_images_in_every_class(self) -> None:
        """A UserError naming the classes without usable images (or attributes no image has)."""
        empty = [n for n, count in zip(self.classes, self.counts(), strict=True) if not count]
        if empty and self.conditioning == "class":
            raise UserError(
                f"{plural(len(empty), 'class')} without usable images "
                f"({_clip(', '.join(empty))}): add images, or remove the class"
            )
        if empty:
            raise UserError(
                f"no usable image has {_clip(', '.join(empty))}: drop it from --attributes"
            )

    def model_fields(self) -> dict:
        """The model's fields that training on these labels sets."""
        if self.clustered:
            counts = self.counts()
            return {"cluster_shares": [count / sum(counts) for count in counts]}
        return {"conditioning": self.conditioning, "classes": list(self.classes)}

    def counts(self) -> list[int]:
        """Images per class (class), or images with each attribute (attributes)."""
        if self.conditioning == "class":
            found = Counter(self.values)
            return [found[i] for i in range(len(self.classes))]
        return [int(sum(row[i] for row in self.values)) for i in range(len(self.classes))]

    def describe(self) -> str:
        """The start-up line: where the labels come from, and images per class."""
        per_class = ", ".join(
            f"{name} {count}" for name, count in zip(self.classes, self.counts(), strict=True)
        )
        kind = "classes" if self.conditioning == "class" else "attributes (images with each)"
        kind = "clusters" if self.clustered else kind
        return f"{len(self.classes)} {kind}: {per_class}"


def require_the_model_classes(model: ModelConfig, labels: Labels | None) -> None:
    """A UserError unless `labels` give the classes a resumed (or --init-from) model has."""
    if model.cluster_shares or (labels and labels.clustered):
        return  # clusters come from the run's own clusters.csv (data/clusters.py checks them)
    given = labels.model_fields() if labels else {"conditioning": "none", "classes": []}
    if given == {"conditioning": model.conditioning, "classes": model.classes}:
        return
    had = f"{model.conditioning} {_clip(', '.join(model.classes))}" if model.classes else "none"
    has = f"{labels.conditioning} {_clip(', '.join(labels.classes))}" if labels else "none"
    raise UserError(
        f"the model was trained on labels {had}, and the data now gives {has}: train on the "
        "same labels (--labels, --attributes), or start a new run"
    )


def class_order(names) -> list[str]:
    """Class names sorted: numerically when all are integers (2 before 10; "7" before "07"),
    else as text. The same order on every process and every run."""
    names = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def read_labels(
    spec: str,
    data_dir: Path,
    files: list[str],
    *,
    attributes: list[str] | None = None,
    on_unlabelled: str = "error",
) -> Labels:
    """The labels of `files` (absolute paths under `data_dir`: every image there, so that a
    label file naming a skipped bad image is not taken for one naming a missing file) from
    `spec`: "folders", or the path of a label file (CSV, or CelebA's attribute list)."""
    data_dir = Path(data_dir).resolve()
    if spec == "folders":
        (found, classes), conditioning = _from_folders(data_dir, files), "class"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"label file {path} does not exist: check the --labels path")
        if _is_attribute_list(path):
            found, classes = _from_attribute_list(path, data_dir, files, attributes)
            conditioning = "attributes"
        else:
            if attributes:
                raise UserError(
                    f"--attributes needs CelebA's attribute list, and {path} is a CSV of "
                    "file,class: drop --attributes"
                )
            (found, classes), conditioning = _from_csv(path, data_dir, files), "class"
    labelled = [f for f in files if f in found]
    unlabelled = len(files) - len(labelled)
    if unlabelled and on_unlabelled == "error":
        first = ", ".join(_relative(f, data_dir) for f in files if f not in found)
        where = "outside any class folder" if spec == "folders" else f"not named in {spec}"
        raise UserError(
            f"{plural(unlabelled, 'image')} in {data_dir} {where} ({_clip(first)}): label them, "
            "or pass --on-unlabelled skip to train on the labelled ones"
        )
    if not labelled:
        raise UserError(
            f"no image in {data_dir} has a label from --labels {spec}: check that the labels "
            "name the files of --data-dir"
        )
    if conditioning == "class":
        index = {name: i for i, name in enumerate(classes)}
        values = [index[found[f]] for f in labelled]
    else:
        values = [found[f] for f in labelled]
    labels = Labels(conditioning=conditioning, classes=classes, files=labelled, values=values)
    if conditioning == "class" and len(classes) < 2:
        raise UserError(
            f"--labels {spec} gives one class ({classes[0]}): conditioning needs two or more"
        )
    labels.require_images_in_every_class()
    return labels


def _relative(file: str, data_dir: Path) -> str:
    path = Path(file)
    return str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else file


def _clip(listing: str, limit: int = 120) -> str:
    return listing if len(listing) <= limit else listing[:limit].rsplit(", ", 1)[0] + ", ..."


def _from_folders(data_dir: Path, files: list[str]) -> tuple[dict[str, str], list[str]]:
    """({file: class}, classes): the class of a file is its first folder under `data_dir`, and
    every folder there is a class (one without images is an error, raised by the caller)."""
    found = {}
    for file in files:
        parts = Path(_relative(file, data_dir)).parts
        if len(parts) > 1 and not parts[0].startswith("."):  # hidden folders are no class
            found[file] = parts[0]
    folders = [p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found, class_order(folders)


def _by_name(data_dir: Path, files: list[str]) -> dict[str, str]:
    return {_relative(f, data_dir): f for f in files}


def _missing(path: Path, named: list[str], data_dir: Path) -> None:
    if named:
        raise UserError(
            f"{path} names {plural(len(named), 'file')} that {data_dir} does not hold "
            f"({_clip(', '.join(named))}): fix the label file or --data-dir"
        )


def _from_csv(path: Path, data_dir: Path, files: list[str]) -> tuple[dict[str, str], list[str]]:
    """({file: class}, the classes named) from rows of `file,class` (paths relative to
    `data_dir`; a header row `file,class` is allowed)."""
    by_name = _by_name(data_dir, files)
    found, missing, named = {}, [], set()
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.reader(f)
        for row in reader:
            number = reader.line_num
            header = tuple(c.strip().lower() for c in row) == CSV_HEADER
            if not row or (number == 1 and header):
                continue
            if len(row) != 2 or not row[1].strip():
                raise UserError(
                    f"{path} line {number} is not `file,class`: give one file and its class a line"
                )
            name, label = row[0].strip(), row[1].strip()
            named.add(label)
            file = by_name.get(name) or by_name.get(_relative(str(data_dir / name), data_dir))
            if file is None:
                missing.append(name)
            elif found.setdefault(file, label) != label:
                raise UserError(
                    f"{path} gives {name} two classes ({found[file]}, {label}): keep one"
                )
    _missing(path, missing, data_dir)
    return found, class_order(named)


def _is_attribute_list(path: Path) -> bool:
    """CelebA's format: the image count on the first line, the attribute names on the second."""
    with open(path) as f:
        return f.readline().strip().isdigit()


def _from_attribute_list(
    path: Path, data_dir: Path, files: list[str], attributes: list[str] | None
) -> tuple[dict[str, list[int]], list[str]]:
    """({file: multi-hot list}, the chosen attribute names) from list_attr_celeba.txt: a count,
    the names, then `file v1 v2 ...` rows of 1 / -1. Files are matched by their path relative
    to `data_dir`, or by name alone."""
    with open(path) as f:
        f.readline()
        names = f.readline().split()
        rows = [(number, line.split()) for number, line in enumerate(f, start=3) if line.strip()]
    if not attributes:
        raise UserError(
            f"{path} lists {len(names)} attributes ({_clip(', '.join(names))}): choose the ones "
            "to condition on with --attributes, e.g. --attributes Smiling,Male"
        )
    repeated = sorted({a for a in attributes if attributes.count(a) > 1})
    if repeated:
        raise UserError(f"--attributes names {', '.join(repeated)} twice: give each once")
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise UserError(
            f"{path} has no attribute {', '.join(unknown)}: choose from {_clip(', '.join(names))}"
        )
    columns = [names.index(a) for a in attributes]
    by_name = _by_name(data_dir, files)
    by_base: dict[str, list[str]] = {}
    for file in files:
        by_base.setdefault(Path(file).name, []).append(file)
    found, missing = {}, []
    for number, row in rows:
        if len(row) != len(names) + 1:
            raise UserError(
                f"{path} line {number} has {len(row) - 1} values for {len(names)} attributes: "
                "give a file and one 1 or -1 per attribute"
            )
        if any(value not in ("1", "-1") for value in row[1:]):
            raise UserError(f"{path} line {number} has a value other than 1 or -1: fix it")
        matches = [by_name[row[0]]] if row[0] in by_name else by_base.get(row[0], [])
        if len(matches) > 1:
            raise UserError(
                f"{path} line {number} names {row[0]}, and {len(matches)} files in {data_dir} "
                "have that name: give paths relative to --data-dir, or keep one of them"
            )
        if not matches:
            missing.append(row[0])
            continue
        values = [int(row[1 + c] == "1") for c in columns]
        if found.setdefault(matches[0], values) != values:
            raise UserError(f"{path} lists {row[0]} twice with other values: keep one line")
    _missing(path, missing, data_dir)
    return found, list(attributes)
