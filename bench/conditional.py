"""`python -m bench.conditional --digits FOLDER`: class-conditional against unconditional training
on the course's digits, at the same budget. FOLDER holds one subfolder per digit
(`python ../shared/data/mnist_folder.py FOLDER --by-class`).

The runs train the digits recipe (launch/configs/mnist28.toml) on every digit for --epochs
epochs, seed 0: as it is (unconditional: trained without labels, self-conditioned on the
recipe's clusters); with the conditional run's batch (so as many steps as it takes); and
conditional, with its overlay launch/configs/mnist28-classes.toml (`--labels folders` and the
settings chosen for it; --conditional FIELD=VALUE over those).
Each is scored on its EMA generator, on the same z:
- FD, class entropy and confidence as the digits benchmark scores them (bench/digit_metrics.py),
  against the same held-out reference, the conditional G asked for labels drawn with the data's
  class frequencies;
- per-class accuracy of the conditional G: of --per-class images asked for each digit, the share
  the digit scorer reads as that digit; beside it, the scorer's own accuracy on real digits.

Writes bench/results/conditional-<machine>-<date>.json and .md, with a grid of each run (8 z a
row; the conditional one a row per digit), and prints the table with the goals beside it. The
step's cost is in `python -m bench` (its recipes table).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.digit_metrics import DigitReference, load_digit_folder
from bench.digit_scorer import features_and_probabilities, load_scorer
from bench.digits import RECIPE_FILE, SAMPLE_SEED, recipe_config
from bench.quality import (
    RESULTS_DIR,
    device_name,
    generate,
    machine,
    result_stem,
    unused_stem,
)
from distgan.config.config import load_toml, make_config
from distgan.data.folder import find_images
from distgan.data.order import steps_per_epoch
from distgan.errors import UserError, exit_on_user_error
from distgan.models.conditioning import draw_labels
from distgan.models.dcgan import sample_latents
from distgan.outputs.checkpoint import load_generator
from distgan.outputs.report import save_grid

GOAL_ACCURACY, GOAL_CLASS_ACCURACY = 0.95, 0.90
CLASSES_OVERLAY = RECIPE_FILE.with_name("mnist28-classes.toml")
GRID_COLUMNS = 8
BATCH = 500  # images a generator call
DIGITS = [str(d) for d in range(10)]


def digit_labels(folder: Path) -> torch.Tensor:
    """The digit of each image of `folder` (its subfolder), in load_digit_folder's order."""
    files = sorted(find_images(folder), key=lambda path: (Path(path).name, path))
    names = [Path(path).parent.name for path in files]
    if not files or any(name not in DIGITS for name in names):
        raise UserError(
            f"{folder} is not one subfolder per digit: write it with mnist_folder.py --by-class"
        )
    return torch.tensor([int(name) for name in names])


def class_accuracy(net, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per digit, the share of the `images` labelled with it that the scorer reads as it."""
    _, probabilities = features_and_probabilities(net, images)
    read = probabilities.argmax(1)
    return [float((read[labels == d] == d).float().mean()) for d in range(10)]


@dataclass(kw_only=True)
class Scoring:
    """The reference digits, the z, and the labels every generator is scored on."""

    reference: DigitReference
    z: torch.Tensor  # the scored samples' latents
    asked: torch.Tensor  # their labels for a conditional G: the data's class frequencies
    per_class_z: torch.Tensor  # per_class latents for each digit, for the accuracy
    per_class: int

    @classmethod
    def of(cls, digits, labels, samples: int, per_class: int) -> Scoring:
        half = len(digits) // 2
        reference = DigitReference.of(load_scorer(), digits[half:], coverage_count=samples)
        seeded = torch.Generator().manual_seed(SAMPLE_SEED)
        config = dataclasses.replace(make_config(load_toml(RECIPE_FILE)).model, channels=1)
        z = sample_latents(config, samples, generator=seeded)
        conditional = dataclasses.replace(config, conditioning="class", classes=DIGITS)
        asked = draw_labels(conditional, samples, generator=seeded, table=labels)
        per_class_z = sample_latents(config, 10 * per_class, generator=seeded)
        return cls(
            reference=reference, z=z, asked=asked, per_class_z=per_class_z, per_class=per_class
        )

    def score(self, generator, grid: Path) -> dict:
        """FD, entropy, confidence and coverage; a grid; per-class accuracy when conditional."""
        conditional = bool(generator.config.classes)
        if conditional and generator.config.classes != DIGITS:
            raise UserError(f"the conditional run's classes are {generator.config.classes}")
        scores = self.reference.score(
            generate(generator, self.z, BATCH, self.asked if conditional else None)
        )
        # Conditional: a row per digit, each column one z; unconditional: 80 z.
        rows = torch.arange(10).repeat_interleave(GRID_COLUMNS) if conditional else None
        grid_z = self.z[:GRID_COLUMNS].repeat(10, 1) if conditional else self.z[: 10 * GRID_COLUMNS]
        images = generate(generator, grid_z, BATCH, rows).float() / 127.5 - 1
        save_grid(images, grid, GRID_COLUMNS)
        if conditional:
            wanted = torch.arange(10).repeat_interleave(self.per_class)
            made = generate(generator, self.per_class_z, BATCH, wanted)
            scores["class_accuracy"] = class_accuracy(self.reference.net, made, wanted)
        return scores


def split_pair(pair: str) -> tuple[str, str]:
    if "=" not in pair:
        raise UserError(f"--conditional {pair}: give FIELD=VALUE, e.g. loss=hinge")
    key, value = pair.split("=", 1)
    return key, value


def field_value(text: str):
    """A number or true/false as such, anything else as text."""
    try:
        return ast.literal_eval(text.replace("true", "True").replace("false", "False"))
    except (ValueError, SyntaxError):
        return text


def run_conditional(args: argparse.Namespace, grids: Path, log) -> dict:
    """Train and score both runs."""
    digits, labels = load_digit_folder(args.digits), digit_labels(args.digits)
    if len(digits) < 2 * args.samples:
        raise UserError(f"{args.digits} holds {len(digits)} digits: --samples needs twice that")
    scoring = Scoring.of(digits, labels, args.samples, args.per_class)
    extra = {key: field_value(value) for key, value in map(split_pair, args.conditional)}
    overlay_batch = recipe_config(Path(), args.digits, 1, 1, args.tiny, (CLASSES_OVERLAY,))
    runs = {
        "unconditional": ((), {}),
        # The conditional run's batch, so its number of steps too: what batch alone gives.
        "unconditional, same batch": ((), {"batch_size": overlay_batch.train.batch_size}),
        "conditional": ((CLASSES_OVERLAY,), extra),
    }
    grids.mkdir(parents=True, exist_ok=True)
    result = {"epochs": args.epochs, "samples": args.samples, "tiny": args.tiny, "runs": {}}
    from distgan.training.trainer import train  # here: the table alone needs no trainer

    with tempfile.TemporaryDirectory(prefix="distgan-conditional-") as scratch:
        for name, (overlays, options) in runs.items():
            out = (args.keep_runs or Path(scratch)) / name.replace(",", "").replace(" ", "-")
            probe = recipe_config(out, args.digits, 1, 1, args.tiny, overlays, **options)
            steps = args.epochs * steps_per_epoch(len(digits), 1, probe.train.batch_size)
            config = recipe_config(out, args.digits, steps, steps, args.tiny, overlays, **options)
            start = time.perf_counter()
            train(config)
            seconds = time.perf_counter() - start
            generator, _ = load_generator(out / "generator.safetensors")
            grid = grids / f"{name.replace(',', '').replace(' ', '-')}.png"
            scores = scoring.score(generator.eval(), grid)
            settings = {"overlays": [Path(o).name for o in overlays], **options}
            scores.update(seconds=round(seconds, 1), steps=steps, settings=settings)
            scores["batch_size"] = config.train.batch_size
            result["runs"][name] = scores
            log(f"  {name} ({seconds:.0f} s): FD {scores['fd']:.2f}")
    result["scorer_on_real"] = class_accuracy(
        scoring.reference.net, digits[len(digits) // 2 :], labels[len(labels) // 2 :]
    )
    return result


def goals(result: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) of each of the issue's quality goals."""
    conditional, plain = result["runs"]["conditional"], result["runs"]["unconditional"]
    same_batch = result["runs"]["unconditional, same batch"]
    accuracy = conditional["class_accuracy"]
    mean, worst = sum(accuracy) / len(accuracy), min(accuracy)
    return [
        (f"accuracy >= {GOAL_ACCURACY:.0%}", f"{mean:.1%}", mean >= GOAL_ACCURACY),
        (f"every class >= {GOAL_CLASS_ACCURACY:.0%}", f"{worst:.1%}", worst >= GOAL_CLASS_ACCURACY),
        (
            "FD no worse than unconditional",
            f"{conditional['fd']:.2f} vs {plain['fd']:.2f}",
            conditional["fd"] <= plain["fd"],
        ),
        (
            "FD no worse than unconditional at the same batch",
            f"{conditional['fd']:.2f} vs {same_batch['fd']:.2f}",
            conditional["fd"] <= same_batch["fd"],
        ),
    ]


def markdown(result: dict) -> str:
    lines = [
        f"# Conditional against unconditional digits: {result['epochs']} epochs, "
        f"{result['samples']} samples",
        "",
        f"{result.get('device', '')}, {result.get('date', '')}. Grids beside this file.",
        "",
        "| run | batch | steps | FD | entropy | confidence | coverage | accuracy | worst class "
        "| train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["runs"].items():
        accuracy = s.get("class_accuracy")
        mean = f"{sum(accuracy) / 10:.1%}" if accuracy else "-"
        worst = f"{min(accuracy):.1%}" if accuracy else "-"
        lines.append(
            f"| {name} | {s['batch_size']} | {s['steps']} | {s['fd']:.2f} | {s['entropy']:.3f} | "
            f"{s['confidence']:.3f} | "
            f"{s['coverage']:.3f} | {mean} | {worst} | {s['seconds']:.0f} |"
        )
    per_digit = " | ".join(DIGITS)
    lines += ["", f"| per-class accuracy | {per_digit} |", "|---|" + "---:|" * 10]
    conditional = result["runs"]["conditional"]["class_accuracy"]
    for name, values in (
        ("conditional G", conditional),
        ("scorer on real", result["scorer_on_real"]),
    ):
        lines.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in values) + " |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in goals(result)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.conditional", description=__doc__)
    parser.add_argument("--digits", type=Path, required=True, help="one subfolder per digit")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5000, help="scored samples per run")
    parser.add_argument("--per-class", type=int, default=500, help="images per digit, accuracy")
    parser.add_argument(
        "--conditional",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="config fields of the conditional run only, over the recipe (e.g. loss=hinge)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-runs", type=Path, metavar="DIR", help="train into DIR/<run> and keep the runs"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="16-channel nets: checks the harness, measures nothing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    with exit_on_user_error():
        info, date = machine(), datetime.date.today().isoformat()
        stem = unused_stem(
            args.out, result_stem(info, date, args.tiny).replace("quality-", "conditional-", 1)
        )
        result = run_conditional(args, args.out / stem, log)
    result.update(device=device_name(info), date=date, machine=info)
    table = markdown(result)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print(table, end="")
    print(f"wrote {args.out / stem}.json, {stem}.md and the grids in {args.out / stem}/")


if __name__ == "__main__":
    main()
