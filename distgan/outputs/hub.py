"""Hugging Face Hub model folders: a run's final (EMA) generator as `RUN/hub/` (config.json,
model.safetensors, a model card README.md showing the final sample grid: model_card.py), and
`python -m distgan.outputs.hub {save,push}`. Loading one back is `Generator.from_pretrained`
(model_folder.py).

The folder is written by the main process into a staging folder that is renamed into place when
complete. An existing folder is replaced only when distgan wrote it and nothing in it changed
since (its manifest of file hashes says so): a card the user edited is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from huggingface_hub import CommitOperationAdd, create_commit, create_repo, get_token
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from distgan.config.config import Config, saved_run_config
from distgan.errors import UserError, exit_on_user_error, first_line
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint_ema,
    read_trainer_state,
    save_generator,
)
from distgan.outputs.checksums import sha256_of
from distgan.outputs.generator_file import GENERATOR_META, GENERATOR_WEIGHTS
from distgan.outputs.model_card import (
    CARD_FILE,
    REPO_PLACEHOLDER,
    SAMPLES_FILE,
    final_score,
    model_card,
)
from distgan.outputs.model_folder import CONFIG_FILE, HUB_DIR, WEIGHTS_FILE
from distgan.runtime.files import write_atomically, write_json_atomically, write_text_atomically

MANIFEST_FILE = ".distgan-manifest.json"  # what distgan wrote: {name: sha256}; never uploaded


def replaceable(folder: Path) -> bool:
    """Whether `folder` is one distgan wrote and nothing in it changed since: exactly the files
    of its manifest, byte for byte."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        entries = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")}
    except (OSError, ValueError):
        return False
    entries.pop(MANIFEST_FILE)
    if not isinstance(manifest, dict) or entries.keys() != manifest.keys():
        return False
    return all(path.is_file() and sha256_of(path) == manifest[n] for n, path in entries.items())


def save_model_folder(
    run_dir: str | Path, generator: Generator, cfg: Config, state: TrainerState, out=None
) -> Path:
    """Write the model folder of `generator` (the EMA G of `state`), by default `RUN/hub/`:
    config.json + model.safetensors (the pair generator.json + generator.safetensors, under the
    Hub's names), the final sample grid and the card. Main process only."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / HUB_DIR
    if out.exists() and not replaceable(out):
        raise UserError(
            f"{out} holds files distgan did not write, or changed since: move it away, or write "
            f"the folder elsewhere with `python -m distgan.outputs.hub save {run_dir} --out DIR`"
        )
    staging, doomed = out.with_name(f".staging-{out.name}"), out.with_name(f".deleting-{out.name}")
    for leftover in (staging, doomed):  # of a crash
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        save_generator(staging, generator, step=state.step, images_seen=state.images_seen)
        (staging / GENERATOR_WEIGHTS).rename(staging / WEIGHTS_FILE)
        (staging / GENERATOR_META).rename(staging / CONFIG_FILE)
        grid = run_dir / "samples" / f"step-{state.step:08d}.png"
        if grid.is_file():
            write_atomically(staging / SAMPLES_FILE, lambda tmp: shutil.copyfile(grid, tmp))
        name = f"distgan DCGAN {state.model.resolution}px: {run_dir.resolve().name}"
        score = final_score(run_dir, state.step)
        card = model_card(cfg, state, name=name, score=score, samples=grid.is_file())
        write_text_atomically(staging / CARD_FILE, str(card))
        manifest = {p.name: sha256_of(p) for p in sorted(staging.iterdir())}
        write_json_atomically(staging / MANIFEST_FILE, manifest, indent=2)
        if out.exists():  # ours and unchanged: replaced in two renames
            out.rename(doomed)
        try:
            staging.rename(out)
        except OSError:
            if doomed.exists():
                doomed.rename(out)  # the old one back, as before
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(doomed, ignore_errors=True)
    return out


def save_at_end(run_dir: Path, generator: Generator, cfg: Config, state: TrainerState) -> None:
    """The model folder at the end of training (main process). When it cannot be written, a
    note instead of an error: the run is done, and its generator is in generator.safetensors."""
    try:
        save_model_folder(run_dir, generator, cfg, state)
    except Exception as err:  # the card's libraries raise their own errors too
        print(f"note: no Hub model folder written: {first_line(err, 300)}", flush=True)


def save_from_run(run_dir: str | Path, out=None) -> Path:
    """`distgan hub save RUN`: the folder of the EMA G in the run's newest checkpoint
    (the final one, for a finished run) and the run's config.toml."""
    run_dir = Path(run_dir)
    kept = list_checkpoints(run_dir / "checkpoints")
    if not kept or not (run_dir / "config.toml").is_file():
        raise UserError(
            f"{run_dir} is not a distgan run folder (no checkpoints/step-* and config.toml): "
            "pass the --out-dir of a training run"
        )
    state = read_trainer_state(kept[-1])
    generator = load_checkpoint_ema(kept[-1], state.model)
    cfg = saved_run_config(run_dir / "config.toml")
    return save_model_folder(run_dir, generator, cfg, state, out)


def upload_set(path: str | Path, onnx=()) -> dict[str, Path]:
    """What `push` uploads, by name in the repository: the model folder's files (hidden ones, the
    manifest, stay home), and ONNX exports: the files given, else a run's own `RUN/*.onnx`.
    `path` is a run folder (its hub/) or a model folder; the model in it is loaded as a check."""
    path = Path(path)
    folder = path if (path / CONFIG_FILE).is_file() else path / HUB_DIR
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(
            f"{path} has no model folder ({HUB_DIR}/{CONFIG_FILE}): write it with "
            f"`python -m distgan.outputs.hub save {path}`"
        )
    Generator.from_pretrained(folder)  # a broken folder is never uploaded
    files = {}
    for file in sorted(folder.rglob("*")):
        name = file.relative_to(folder).as_posix()
        if file.is_file() and not any(part.startswith(".") for part in name.split("/")):
            files[name] = file
    exports = [Path(p) for p in onnx] or (sorted(path.glob("*.onnx")) if folder != path else [])
    for export in exports:
        if not export.is_file():
            raise UserError(
                f"--onnx {export} does not exist: export it with `python -m export onnx`"
            )
        if export.name in files and files[export.name].resolve() != export.resolve():
            raise UserError(
                f"{export} and {files[export.name]} would both be {export.name} in the "
                "repository: rename one"
            )
        files[export.name] = export
    return files


def push(path, repo_id: str, *, private: bool = False, onnx=(), log=print) -> str:
    """Upload the upload set of `path` to the model repo `repo_id` (created if needed) in one
    commit; the card's placeholder becomes the repo id. Returns the repo's URL."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--repo-id {repo_id!r} is not a Hub repo id: use user/name") from None
    files = upload_set(path, onnx)
    if get_token() is None:
        raise UserError(
            "no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN), then push again"
        )
    operations = []
    for name, file in files.items():
        log(f"  {name} ({file.stat().st_size:,} bytes)")
        content = str(file)
        if name == CARD_FILE:
            content = file.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id).encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    try:
        url = create_repo(repo_id, private=private or None, exist_ok=True)
        create_commit(repo_id, operations, commit_message="Upload distgan generator")
    except (OSError, ValueError, HTTPError) as err:
        raise UserError(
            f"could not upload to {repo_id} ({type(err).__name__}: {first_line(err, 160)}): "
            "check the network, and that your token may write to that namespace"
        ) from None
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distgan.outputs.hub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="(re)write a run's model folder from its checkpoint")
    save.add_argument("run", type=Path, help="a training output folder")
    save.add_argument("--out", type=Path, help=f"the folder to write (default: RUN/{HUB_DIR})")
    push_ = commands.add_parser("push", help="upload a run's model folder to the Hub")
    push_.add_argument(
        "run", type=Path, help=f"a training output folder (its {HUB_DIR}/) or a model folder"
    )
    push_.add_argument(
        "--repo-id", required=True, help="the model repo, user/name (created if needed)"
    )
    push_.add_argument("--private", action="store_true", help="create the repo private")
    push_.add_argument(
        "--onnx",
        type=Path,
        nargs="+",
        default=(),
        help="ONNX exports to upload too (default: RUN/*.onnx)",
    )
    push_.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded, upload nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        if args.command == "save":
            print(f"wrote {save_from_run(args.run, args.out)}")
        elif args.dry_run:
            for name, file in upload_set(args.run, args.onnx).items():
                print(f"{name}\t{file}")
        else:
            url = push(args.run, args.repo_id, private=args.private, onnx=args.onnx)
            print(f"uploaded to {url}")


if __name__ == "__main__":
    main()
