"""A run's whole configuration (Config): its sections, read from TOML files and flat overrides,
saved with the run, and merged with what a resumed run may change.

Precedence: dataclass defaults < `--config FILE.toml` < flags. A config.toml written before the
sections were split by concern ([train] held every training field) still loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from distgan.config.model import ModelConfig
from distgan.config.rules import base_type, choices, is_resolved, on_resume
from distgan.config.sections import (
    DataConfig,
    EvalConfig,
    FailuresConfig,
    OutputsConfig,
    TrainConfig,
)
from distgan.errors import UserError
from distgan.runtime.files import write_text_atomically

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "outputs": OutputsConfig,
    "eval": EvalConfig,
    "failures": FailuresConfig,
}
OLD_HOME = "train"  # where every training field lived before the sections were split


def settable_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config section that a flag or the config file sets."""
    return [f for f in dataclasses.fields(cls) if not is_resolved(f)]


def _settable_values(section) -> dict:
    names = {f.name for f in settable_fields(type(section))}
    return {k: v for k, v in dataclasses.asdict(section).items() if k in names}


# Every field by name (field names are unique across sections), with its section.
OWNER = {f.name: name for name, cls in SECTIONS.items() for f in settable_fields(cls)}
FIELDS = {f.name: f for cls in SECTIONS.values() for f in settable_fields(cls)}


@dataclass(kw_only=True)
class Config:
    """Everything a training run needs; TOML sections [model], [data], [train], [outputs],
    [eval], [failures]."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    failures: FailuresConfig = field(default_factory=FailuresConfig)
    given: frozenset[str] = field(default=frozenset(), compare=False)
    """The fields the user set (a flag, or the --config file); the rest are defaults."""

    def __post_init__(self) -> None:
        # ModelConfig.d_classifier's rule: the model's conditioning is set from the data's labels
        # (or clusters) only later, so the flag is checked against --labels here.
        if self.model.d_classifier and self.data.labels == "none" and not self.data.clusters:
            raise UserError(
                "d_classifier needs labels to learn: give --labels (folders, or a label file) or "
                "--clusters K, or leave out --d-classifier"
            )

    def values(self) -> dict:
        """Every settable field of every section by name."""
        return {k: v for name in SECTIONS for k, v in _settable_values(getattr(self, name)).items()}

    def to_dict(self) -> dict:
        """Sections of plain values, unset (None) fields left out since TOML has no null."""
        return {
            name: {k: v for k, v in _settable_values(getattr(self, name)).items() if v is not None}
            for name in SECTIONS
        }

    def save_toml(self, path: str | Path) -> None:
        write_text_atomically(path, tomli_w.dumps(self.to_dict()))


def _check_keys(section: str, values: dict, cls: type) -> None:
    known = [f.name for f in settable_fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise UserError(f"unknown key {key!r} in [{section}]{hint}")


def _from_old_home(raw: dict) -> dict:
    """A file written before the split: its [train] keys that now live in another section are
    moved there (a key given in both places keeps the new section's value)."""
    old = raw.get(OLD_HOME)
    if not isinstance(old, dict):
        return raw
    moved = {key: value for key, value in old.items() if OWNER.get(key, OLD_HOME) != OLD_HOME}
    raw[OLD_HOME] = {key: value for key, value in old.items() if key not in moved}
    for key, value in moved.items():
        section = raw.setdefault(OWNER[key], {})
        if isinstance(section, dict):
            section.setdefault(key, value)
    return raw


def load_toml(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: check the --config path") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    for section, values in _from_old_home(raw).items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            listed = ", ".join(f"[{name}]" for name in SECTIONS)
            raise UserError(f"unknown section [{section}] in {path}: use {listed}{hint}")
        if not isinstance(values, dict):
            raise UserError(f"{section} in {path} must be a [{section}] table")
        _check_keys(section, values, SECTIONS[section])
    return raw


def load_toml_layers(paths) -> dict[str, dict]:
    """The sections of several config files, each file's values over the ones before it."""
    sections: dict[str, dict] = {}
    for path in paths:
        for section, values in load_toml(path).items():
            sections.setdefault(section, {}).update(values)
    return sections


def _check_types(section: str, values: dict, cls: type) -> None:
    """TOML values must have the field's type: a clear error beats a crash deep in training."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        base, optional = base_type(hints[key])
        if value is None and optional:
            continue
        expected = list if typing.get_origin(base) is list else base
        allowed = choices(hints[key])
        if allowed:
            expected = str
            if type(value) is int and str(value) in allowed:  # TOML's channels = 1 means "1"
                values[key] = value = str(value)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
            ok = True
        if not ok:
            raise UserError(
                f"{key}={value!r} in [{section}] is not allowed: expected {expected.__name__}"
            )


def make_config(sections: dict[str, dict] | None = None, **overrides) -> Config:
    """A Config from section dicts plus flat field overrides (any section's field by name)."""
    merged = {name: dict((sections or {}).get(name, {})) for name in SECTIONS}
    for key, value in overrides.items():
        if key not in OWNER:
            close = difflib.get_close_matches(key, list(OWNER), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        merged[OWNER[key]][key] = value
    for name, cls in SECTIONS.items():
        _check_types(name, merged[name], cls)
    given = frozenset(key for values in merged.values() for key in values)
    try:
        built = {name: cls(**merged[name]) for name, cls in SECTIONS.items()}
    except ValueError as err:  # a value rejected by a section's __post_init__
        raise UserError(str(err)) from None
    return Config(**built, given=given)


def saved_run_config(path: str | Path) -> Config:
    """The config a run saved in its config.toml, the fields it predates filled in with what it
    trained with (a field's `before_it` rule)."""
    sections = load_toml(path)
    for name, f in FIELDS.items():
        if "before_it" in f.metadata and name not in sections.get(OWNER[name], {}):
            sections.setdefault(OWNER[name], {})[name] = f.metadata["before_it"]
    return make_config(sections)


def resume_config(saved: Config, requested: Config) -> tuple[Config, dict[str, tuple]]:
    """The config a resumed run goes on with: the saved run's, with what the user changed
    (`requested.given`) applied. A change to a field fixed on resume (model, data, losses,
    batch, seed: its `on_resume` rule) is a one-line error. Returns the config and
    {field: (old, new)}."""
    old, new = saved.values(), requested.values()
    not_compared = {name for name, f in FIELDS.items() if on_resume(f) == "not compared"}
    asked = requested.given - not_compared
    changes = {key: (old[key], new[key]) for key in sorted(asked) if old[key] != new[key]}
    refused = [key for key in changes if on_resume(FIELDS[key]) == "fixed"]
    if refused:
        listed = ", ".join(f"{key} {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise UserError(
            f"{requested.outputs.out_dir} holds a run trained with other settings ({listed}), "
            "which cannot change when it resumes: drop those flags to resume it, or train anew "
            "in a new --out-dir (--resume none refuses to overwrite this one)"
        )
    kept = changes.keys() | not_compared
    merged = {key: new[key] if key in kept else value for key, value in old.items()}
    unset = {key for key, value in merged.items() if value is None}  # the defaults
    config = make_config(**{key: merged[key] for key in merged.keys() - unset})
    return dataclasses.replace(config, given=requested.given), changes
