"""The standalone generator file, read without building a model: generator.safetensors and the
generator.json that describes it (in a Hub model folder the same pair is named model.safetensors
and config.json). The description gives the ModelConfig; the caller builds the model from it and
loads the weights into it (`GeneratorFiles.load_into`). Safetensors and JSON only: nothing is
unpickled. checkpoint.py writes the pair.

Imports no distgan.models: `Generator.from_pretrained` reads through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from distgan.config.model import ModelConfig
from distgan.errors import UserError, first_line

GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_META = "generator.json"
GENERATOR_FORMAT = "distgan-generator"


class GeneratorFiles(NamedTuple):
    """A generator's weights file and the description next to it, the description read and
    checked (`read_generator_files`)."""

    weights: Path
    description: Path
    config: ModelConfig  # the architecture the weights are for
    meta: dict  # everything the description holds

    def load_into(self, model: nn.Module) -> None:
        """Load the weights into `model`, built from `config`; a one-line UserError where the
        file does not hold them (other shapes, or not a safetensors file)."""
        try:
            model.load_state_dict(load_file(str(self.weights)))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise UserError(
                f"{self.weights} does not hold the weights {self.description.name} describes "
                f"({first_line(err)})"
            ) from None


def read_generator_files(path: str | Path, meta_name: str = GENERATOR_META) -> GeneratorFiles:
    """`generator.safetensors` (or the run folder holding it) and its description, `meta_name`
    next to it (config.json in a Hub model folder); a one-line UserError where either is missing
    or the description is not a distgan generator's."""
    path = Path(path)
    weights_path = path / GENERATOR_WEIGHTS if path.is_dir() else path
    meta_path = weights_path.with_name(meta_name)
    if not weights_path.is_file():
        raise UserError(
            f"{weights_path} does not exist: pass a run folder or its {GENERATOR_WEIGHTS}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != GENERATOR_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        config = ModelConfig.from_dict(meta["model"])
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing: keep it next to {weights_path.name}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{meta_path} is not a distgan generator description ({err})") from None
    return GeneratorFiles(weights_path, meta_path, config, meta)
