"""The trainer's command line: one flag per config field, named after it (`batch_size` ->
`--batch-size`) and documented by the field's docstring, grouped by section; over the
`--config FILE.toml ...` values (later files over earlier ones), over the defaults."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing

from distgan.config.config import (
    SECTIONS,
    Config,
    load_toml_layers,
    make_config,
    settable_fields,
)
from distgan.config.rules import base_type, choices


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flags(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    group = parser.add_argument_group(f"[{section}]", summary)
    for f in settable_fields(cls):
        base, _ = base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = " ".join(map(str, f.default_factory()))
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        allowed = choices(hints[f.name])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif allowed:  # checked by the dataclass, so a bad value is the same one-line error
            kwargs.update(type=str, metavar="{" + ",".join(allowed) + "}")
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            kwargs.update(type=item, nargs="+", metavar="N" if item is int else "NAME")
        else:
            kwargs.update(type=base, metavar=base.__name__.upper())
        group.add_argument(_flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a DCGAN on a folder of face images (or the built-in faces). Run under "
        "`accelerate launch` for several processes; plain `python` runs one.",
    )
    listed = " ".join(f"[{name}]" for name in SECTIONS)
    about = (
        f"TOML files with {listed} sections, each over the ones before it (a recipe, then an "
        "overlay such as launch/configs/mnist28-classes.toml); flags given here override them"
    )
    parser.add_argument("--config", metavar="FILE.toml", nargs="+", help=about)
    for section, cls in SECTIONS.items():
        _add_flags(parser, section, cls)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config for a command line: defaults, then each --config FILE in turn, then the flags
    given."""
    args = vars(build_parser().parse_args(argv))
    sections = load_toml_layers(args.pop("config", None) or [])
    return make_config(sections, **args)
