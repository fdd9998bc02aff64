"""A distgan model folder: config.json + model.safetensors (the generator file under the Hub's
names), as a run's hub/ holds it or a Hugging Face Hub repo does. `read_model_folder` finds one,
a local folder or a repo id (those two files downloaded into the Hugging Face cache), and reads it
without building a model: `Generator.from_pretrained` builds the model from its ModelConfig and
loads the weights. Safetensors and JSON only: nothing is unpickled.

Imports no distgan.models (directly or through others), so models/ may use it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from distgan import __version__
from distgan.errors import UserError, first_line
from distgan.outputs.generator_file import GeneratorFiles, read_generator_files

HUB_DIR = "hub"  # in a run folder
CONFIG_FILE = "config.json"  # generator.json's contents, under the Hub's name
WEIGHTS_FILE = "model.safetensors"
LIBRARY = "distgan"


def local_folder(source: str, revision: str | None = None) -> Path:
    """The folder `source` names: a local one, or a Hub repo's files (config.json and
    model.safetensors only), downloaded into the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{source} is a file: pass a distgan model folder ({CONFIG_FILE} + "
                f"{WEIGHTS_FILE}, such as RUN/{HUB_DIR}) or a Hub repo id"
            )
        return path
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise UserError(
            f"{source} does not exist, and is not a Hub repo id (user/name) either"
        ) from None
    try:
        downloaded = snapshot_download(
            source,
            revision=revision,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
            library_name=LIBRARY,
            library_version=__version__,
        )
    except (OSError, ValueError, HTTPError) as err:
        raise UserError(
            f"could not download {source} from the Hugging Face Hub ({first_line(err, 160)}): "
            "check the name and the network (a private repo needs `hf auth login`)"
        ) from None
    return Path(downloaded)


def read_model_folder(source: str | Path, *, revision: str | None = None) -> GeneratorFiles:
    """The weights file and the ModelConfig of a distgan model folder, or of a Hub repo id
    holding one (`Generator.from_pretrained` loads them into the model it builds)."""
    folder = local_folder(str(source), revision)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{source} is not a distgan model folder (no {' or '.join(missing)}): pass a folder "
            f"distgan wrote (RUN/{HUB_DIR}, `distgan hub save RUN`) or its Hub repo id"
        )
    return read_generator_files(folder / WEIGHTS_FILE, meta_name=CONFIG_FILE)
