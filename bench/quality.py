"""`python -m bench.quality`: how good the faces a fixed training budget makes are, for each amount
of data and each augmentation setting, and whether augmentation earns its place as the default.

It trains the real trainer (`training.trainer.train`) at 32 px on the first 500, 2,000 and 10,000
built-in faces with each `--augment` setting, scores 1,000 samples of the EMA generator at each
quarter of the budget (the learning rates are constant, so the half-way checkpoint is what a run
of half the steps ends with; the four points show whether a run still improves or has turned
worse), at the full budget also with BatchNorm re-estimation
(`models.ema.recalibrate_batchnorm`), and puts the numbers on a scale: real faces against the
reference (the floor) and uniform noise (the ceiling). Scores (bench/quality_metrics.py): the
Fréchet distance in the features of a network trained to read the faces' drawing parameters
back (bench/quality_features.py), and coverage in the parameters it reads.

Writes bench/results/quality-<machine>-<date>.json and .md, a sample grid per setting, prints the
tables, which setting meets the goals, and the recommended default. With `--digits DIR` it runs
the digits benchmark instead (bench/digits.py: real MNIST digits, scored by a digit classifier).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.quality_features import RECORD_FILE, RESOLUTION, load_images, load_net, train_features
from bench.quality_metrics import NEAREST, Reference
from bench.run import cpu_model, machine_slug
from distgan.config.choices import APPLIED_AUGMENTS
from distgan.config.config import make_config
from distgan.data.faces import ensure_builtin_faces, render_size
from distgan.data.folder import find_images
from distgan.errors import UserError, exit_on_user_error
from distgan.metrics.features import to_uint8
from distgan.models.dcgan import Generator, sample_latents
from distgan.models.ema import recalibrate_batchnorm
from distgan.outputs.checkpoint import checkpoint_dir, load_checkpoint_ema, load_generator
from distgan.outputs.report import read_jsonl, save_grid
from distgan.training.precision import resolve_mixed_precision
from distgan.training.trainer import train

RESULTS_DIR = Path(__file__).resolve().parent / "results"
AUGMENTS = APPLIED_AUGMENTS  # auto is one of them, by the data's size
BASELINE = "none"  # today's default, which every other setting is measured against
SMALL_DATA_GAIN = 2.0  # goal: this many times lower distance than the baseline on small subsets
SAMPLE_SEED = 1234  # the z of every scored sample set: the same faces-to-be for every generator
GRID_IMAGES = 64
CURVE_POINTS = 4  # each run's EMA generator is scored at each quarter of the budget


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one benchmark run trains and scores."""

    steps: int  # training steps of every run; scored at each quarter (half-budget: steps // 2)
    batch_size: int
    g_channels: int
    d_channels: int
    subsets: tuple[int, ...]  # each run trains on the first N built-in faces
    augments: tuple[str, ...]
    samples: int  # images scored per generator, and per set of the scale
    faces: int  # built-in faces loaded: the first half holds the floor, the second the reference
    diffaugment_ops: tuple[str, ...] | None = None  # DiffAugment's ops; None: the trainer's default
    tiny: bool = False

    def __post_init__(self) -> None:
        if self.steps < CURVE_POINTS or self.steps % CURVE_POINTS:
            raise UserError(
                f"--steps {self.steps}: use a multiple of {CURVE_POINTS} (the runs are scored at "
                "each quarter of the budget)"
            )
        if self.samples > self.faces // 2:
            raise UserError(
                f"--samples {self.samples} is more than half the {self.faces} faces: the real "
                "floor needs that many faces outside the reference half"
            )
        if max(self.subsets) > self.faces:
            raise UserError(f"--subsets {max(self.subsets)} is more than the {self.faces} faces")
        if self.diffaugment_ops is not None:  # refused before any run trains, not at the first
            make_config(diffaugment_ops=list(self.diffaugment_ops))
        unknown = sorted(set(self.augments) - set(AUGMENTS))
        if unknown or BASELINE not in self.augments:
            raise UserError(
                f"--augments {' '.join(self.augments)}: use some of {', '.join(AUGMENTS)}, "
                f"{BASELINE} among them (the baseline)"
            )

    @property
    def half(self) -> int:
        return self.steps // 2

    @property
    def scored_steps(self) -> tuple[int, ...]:
        return scored_steps(self.steps)


def scored_steps(steps: int) -> tuple[int, ...]:
    """The steps a run of `steps` is scored at: each quarter of the budget."""
    return tuple(steps * k // CURVE_POINTS for k in range(1, CURVE_POINTS + 1))


# About 10 minutes (560 s) on the 2-core CPU this project is developed on, run alone; the limit
# is 15. Half-width G and D (32) train about twice as fast as the default 64, so the budget buys
# twice the steps (600 steps at width 64 mostly measured how fast each setting converges).
# Longer runs did not bring the overfitting augmentation cures either (bench/README.md).
FULL = Plan(
    steps=1200,
    batch_size=64,
    g_channels=32,
    d_channels=32,
    subsets=(500, 2_000, 10_000),
    augments=AUGMENTS,
    samples=1_000,
    faces=10_000,
)
# CI: the same code on a run small enough for a test (the conftest's 240 cached faces).
TINY = Plan(
    steps=20,
    batch_size=16,
    g_channels=16,
    d_channels=16,
    subsets=(64,),
    augments=("none", "diffaugment"),
    samples=100,
    faces=240,
    tiny=True,
)


def train_one(plan: Plan, subset: int, augment: str, run_dir: Path, cache_dir: str | None):
    """Train one run with the trainer itself; a checkpoint (with the EMA) at each scored step."""
    ops = {"diffaugment_ops": list(plan.diffaugment_ops)} if plan.diffaugment_ops else {}
    cfg = make_config(
        out_dir=str(run_dir),
        resume="none",
        resolution=RESOLUTION,
        g_channels=plan.g_channels,
        d_channels=plan.d_channels,
        batch_size=plan.batch_size,
        max_steps=plan.steps,
        builtin_faces=subset,
        cache_dir=cache_dir,
        augment=augment,
        **ops,
        seed=0,
        log_every=min(10, plan.scored_steps[0]),
        sample_every=plan.steps,
        ckpt_every=plan.scored_steps[0],
        keep_checkpoints=CURVE_POINTS,
        report_to="none",
    )
    train(cfg)


def ema_generators(run_dir: Path, steps: tuple[int, ...]) -> dict[int, Generator]:
    """The EMA generator of the run in `run_dir` at each of `steps`; at the last, the run's
    generator file."""
    final, _ = load_generator(run_dir)
    generators = {
        step: load_checkpoint_ema(checkpoint_dir(run_dir / "checkpoints", step), final.config)
        for step in steps[:-1]
    }
    return {step: g.requires_grad_(False) for step, g in generators.items()} | {steps[-1]: final}


@torch.no_grad()
def generate(
    generator: Generator,
    z: torch.Tensor,
    batch_size: int = 250,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 images of `generator` (eval mode) for latents `z` (and, when conditional,
    `labels`), rounded as a PNG of them."""
    parts = []
    for i in range(0, len(z), batch_size):
        batch = z[i : i + batch_size]
        # Unconditional: z alone (the reference loop's generators take nothing else).
        made = generator(batch) if labels is None else generator(batch, labels[i : i + batch_size])
        parts.append(to_uint8(made))
    return torch.cat(parts)


def score_generator(
    reference: Reference, generator: Generator, z: torch.Tensor, recalibrated: bool
) -> dict:
    """Scores of the generator as trained (`ema`) and, if `recalibrated`, with its BatchNorm
    statistics re-estimated for its own weights (`ema_bn`)."""
    scores = {"ema": reference.score(generate(generator, z))}
    if recalibrated:
        generator = copy.deepcopy(generator)
        recalibrate_batchnorm(generator)
        scores["ema_bn"] = reference.score(generate(generator, z))
    return scores


def measure_scale(reference: Reference, faces: torch.Tensor, plan: Plan) -> dict:
    """What the scores mean: real faces the reference does not hold (the floor), uniform noise
    (the ceiling), and, for subsets smaller than the sample count, the subset's own faces
    repeated (a generator that copies its training faces perfectly)."""
    noise = torch.randint(
        0,
        256,
        (plan.samples, 3, RESOLUTION, RESOLUTION),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(SAMPLE_SEED),
    )
    scale = {
        "real": reference.score(faces[: plan.samples]),
        "noise": reference.score(noise),
    }
    for subset in plan.subsets:
        if subset < plan.samples:
            repeated = torch.arange(plan.samples) % subset
            scale[f"copies of {subset}"] = reference.score(faces[repeated])
    return scale


def evaluate_goals(runs: list[dict], plan: Plan) -> dict:
    """For each setting, each goal: its FD (EMA as trained), the bound, and whether it is met.
    Smaller subsets than the whole set: FD at most 1/SMALL_DATA_GAIN of the baseline's; the
    whole set: no more than the baseline's; every subset: FD at half the steps no more than the
    baseline's at the full budget."""
    fd = {
        (r["images"], r["augment"], at): r["scores"][str(at)]["ema"]["fd"]
        for r in runs
        for at in (plan.half, plan.steps)
    }
    goals = {}
    for augment in plan.augments:
        checks = []
        for subset in plan.subsets:
            baseline = fd[subset, BASELINE, plan.steps]
            if augment != BASELINE:
                small = subset < plan.faces
                bound = baseline / SMALL_DATA_GAIN if small else baseline
                what = (
                    f"{subset} images: <= {f'1/{SMALL_DATA_GAIN:g} of ' if small else ''}{BASELINE}"
                )
                checks.append({"goal": what, "fd": fd[subset, augment, plan.steps], "bound": bound})
            what = f"{subset} images, {plan.half} steps: <= {BASELINE} at {plan.steps}"
            checks.append({"goal": what, "fd": fd[subset, augment, plan.half], "bound": baseline})
        for check in checks:
            check["met"] = check["fd"] <= check["bound"]
        goals[augment] = {
            "checks": checks,
            "all_met": augment != BASELINE and all(c["met"] for c in checks),
        }
    return goals


def recommend(runs: list[dict], goals: dict, plan: Plan) -> dict:
    """The default to suggest: of the settings whose FD at the full budget is no higher than the
    baseline's on any subset (no harm anywhere), the one with the lowest geometric mean FD over
    the subsets; whether it also meets every goal is reported beside it."""

    def full_fd(augment: str, subset: int) -> float:
        return next(
            r["scores"][str(plan.steps)]["ema"]["fd"]
            for r in runs
            if r["augment"] == augment and r["images"] == subset
        )

    def mean_log_fd(augment: str) -> float:
        values = [full_fd(augment, subset) for subset in plan.subsets]
        return sum(math.log(max(v, 1e-12)) for v in values) / len(values)

    harmless = [
        augment
        for augment in plan.augments
        if all(full_fd(augment, s) <= full_fd(BASELINE, s) for s in plan.subsets)
    ]
    default = min(harmless, key=mean_log_fd)  # the baseline is always among them
    best = min(plan.augments, key=mean_log_fd)
    return {"default": default, "meets_goals": goals[default]["all_met"], "best_fd": best}


def run_benchmark(
    plan: Plan, samples_dir: Path, cache_dir: str | None, work_dir: Path, log
) -> dict:
    """Train and score every run of `plan` (runs in `work_dir`, grids in `samples_dir`); the
    result as written to the JSON file."""
    started = time.perf_counter()
    net = load_net()
    folder = ensure_builtin_faces(plan.faces, render_size(RESOLUTION), cache_dir)
    faces = load_images(find_images(folder))
    reference = Reference.of(net, faces[plan.faces // 2 :], coverage_count=plan.samples)
    scale = measure_scale(reference, faces, plan)
    log(f"scale: real faces FD {scale['real']['fd']:.3f}, noise FD {scale['noise']['fd']:.1f}")
    samples_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for subset in plan.subsets:
        for augment in plan.augments:
            log(f"training on {subset} faces, augment {augment}, {plan.steps} steps ...")
            run_dir = work_dir / f"{subset}-{augment}"
            start = time.perf_counter()
            train_one(plan, subset, augment, run_dir, cache_dir)
            train_seconds = time.perf_counter() - start
            generators = ema_generators(run_dir, plan.scored_steps)
            final = generators[plan.steps]
            z = fixed_latents(final, plan.samples)
            scores = {
                str(at): score_generator(reference, g, z, recalibrated=at == plan.steps)
                for at, g in generators.items()
            }
            grid = samples_dir / f"{subset}-{augment}.png"
            with torch.no_grad():
                save_grid(final(z[:GRID_IMAGES]), grid)
            last = read_jsonl(run_dir / "metrics.jsonl")[-1]
            runs.append(
                {
                    "images": subset,
                    "augment": augment,
                    "train_seconds": round(train_seconds, 1),
                    "aug_p": last.get("aug_p"),
                    "scores": scores,
                    "grid": f"{samples_dir.name}/{grid.name}",
                }
            )
            curve = ", ".join(f"{at}: {s['ema']['fd']:.1f}" for at, s in scores.items())
            full = scores[str(plan.steps)]["ema"]
            log(f"  FD {curve}; coverage {full['coverage']:.3f} ({train_seconds:.0f} s)")
    goals = evaluate_goals(runs, plan)
    return {
        "plan": asdict(plan),
        "resolution": RESOLUTION,
        "precision": resolve_mixed_precision("auto"),
        "diffaugment_ops": list(plan.diffaugment_ops or make_config().train.diffaugment_ops),
        "feature_net": feature_net_summary(),
        "reference": f"built-in faces {plan.faces // 2}..{plan.faces - 1}",
        "coverage_k": NEAREST,
        "scale": scale,
        "runs": runs,
        "goals": goals,
        "recommendation": recommend(runs, goals, plan),
        "seconds": round(time.perf_counter() - started, 1),
    }


def fixed_latents(generator: Generator, count: int) -> torch.Tensor:
    seeded = torch.Generator().manual_seed(SAMPLE_SEED)
    return sample_latents(generator.config, count, generator=seeded)


def machine() -> dict:
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def device_name(info: dict) -> str:
    return info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"


def feature_net_summary() -> dict:
    """The committed feature network's record: how well it reads each parameter group."""
    if not RECORD_FILE.is_file():
        return {}
    record = json.loads(RECORD_FILE.read_text())
    return {"r2_groups": record["r2_groups"], "what": record["what"]}


def markdown(result: dict) -> str:
    """The tables of a result: the scale, every run, the goals, the recommendation."""
    plan = result["plan"]
    samples, full = plan["samples"], plan["steps"]
    scored = [str(at) for at in scored_steps(full)]
    ops = result.get("diffaugment_ops")  # results saved before the ops were chosen: all three
    ops_note = f", DiffAugment ops {' '.join(ops)}" if ops else ""
    lines = [
        f"### Quality: built-in faces at {result['resolution']} px, {full} steps x batch "
        f"{plan['batch_size']}, G/D widths {plan['g_channels']}/{plan['d_channels']}, "
        f"{result['precision']}, {samples} EMA samples per generator{ops_note}"
        + (" (tiny: a smoke test, not a measurement)" if plan["tiny"] else ""),
        "",
        f"`python -m bench.quality{' --tiny' if plan['tiny'] else ''}`, {result['date']}, "
        f"{device_name(result['machine'])}; "
        f"{result['seconds']:.0f} s. Reference: {result['reference']}; FD: Fréchet distance in "
        f"the feature network's features (lower is better); coverage: share of reference faces "
        f"with a sample among their {result['coverage_k']} nearest neighbours in predicted "
        "parameters (higher is better).",
        "",
        f"| scale: {samples} images | FD | coverage |",
        "|---|---:|---:|",
    ]
    names = {
        "real": f"real faces 0..{samples - 1} (the floor)",
        "noise": "uniform noise (the ceiling)",
    }
    for name, scores in result["scale"].items():
        label = names.get(name, f"the first {name.split()[-1]} faces, repeated (a perfect copier)")
        lines.append(f"| {label} | {scores['fd']:.3f} | {scores['coverage']:.3f} |")
    lines += [
        "",
        "| training images | augment | "
        + " | ".join(f"FD {at} steps" for at in scored)
        + f" | FD {full} steps, BN re-estimated | coverage {full} steps | coverage, BN "
        "re-estimated | ADA p | train s |",
        "|---:|---|" + "---:|" * (len(scored) + 5),
    ]
    for run in result["runs"]:
        curve = " | ".join(f"{run['scores'][at]['ema']['fd']:.3f}" for at in scored)
        end = run["scores"][str(full)]
        aug_p = "" if run["aug_p"] is None else f"{run['aug_p']:.3f}"
        lines.append(
            f"| {run['images']} | {run['augment']} | {curve} | {end['ema_bn']['fd']:.3f} | "
            f"{end['ema']['coverage']:.3f} | {end['ema_bn']['coverage']:.3f} | "
            f"{aug_p} | {run['train_seconds']:.0f} |"
        )
    lines += ["", "| augment | goal | FD | bound | met |", "|---|---|---:|---:|---|"]
    for augment, goal in result["goals"].items():
        for check in goal["checks"]:
            met = "yes" if check["met"] else "no"
            figures = f"{check['fd']:.3f} | {check['bound']:.3f}"
            lines.append(f"| {augment} | {check['goal']} | {figures} | {met} |")
    lines += ["", bn_summary(result["runs"], str(full)), "", recommendation_line(result)]
    return "\n".join(lines) + "\n"


def bn_summary(runs: list[dict], full: str) -> str:
    """How BatchNorm re-estimation changes the final EMA generators' FD."""
    ratios = sorted(
        r["scores"][full]["ema_bn"]["fd"] / r["scores"][full]["ema"]["fd"] for r in runs
    )
    better = sum(ratio < 1 for ratio in ratios)
    median = ratios[len(ratios) // 2]
    return (
        f"BatchNorm re-estimation (`recalibrate_batchnorm`): FD lower for {better} of "
        f"{len(ratios)} EMA generators; median FD ratio re-estimated / as trained {median:.3f}."
    )


def recommendation_line(result: dict) -> str:
    met = [a for a, goal in result["goals"].items() if goal["all_met"]]
    rec = result["recommendation"]
    if rec["meets_goals"]:
        others = (
            f" (also meeting them: {', '.join(a for a in met if a != rec['default'])})"
            if len(met) > 1
            else ""
        )
        return f"**Recommended default: --augment {rec['default']}**: it meets every goal{others}."
    if rec["default"] == BASELINE:
        return (
            f"**Recommended default: --augment {BASELINE}** (unchanged): no augmentation setting "
            f"is at least as good as {BASELINE} on every subset."
        )
    return (
        f"**Recommended default: --augment {rec['default']}**: the lowest FD at the full budget, "
        f"and no higher than {BASELINE}'s on any subset; it does not meet every goal above"
        f"{' (nor does any setting)' if not met else ''}."
    )


def result_stem(info: dict, date: str, tiny: bool) -> str:
    """quality-<machine>-<date>[-tiny]: the name of the JSON, the markdown and the grids' folder."""
    slug = machine_slug(
        {"cpu": info["cpu"], "cpu_cores": info["cpu_cores"], "gpu": info.get("gpu")}
    )
    return f"quality-{slug}-{date}{'-tiny' if tiny else ''}"


def unused_stem(out: Path, stem: str) -> str:
    """`stem`, or stem-2, stem-3, ...: a second run on the same day keeps the first one's files."""
    candidate, number = stem, 1
    while (out / f"{candidate}.json").exists() or (out / candidate).exists():
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps on 240 faces: the test suite's smoke run"
    )
    parser.add_argument(
        "--digits",
        type=Path,
        metavar="DIR",
        help="the digits benchmark instead (bench/digits.py) on a folder of 28 px digits, e.g. "
        "mnist_folder.py's 10,000 real MNIST digits",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --digits: trainings run at a time, each in its own process on its share of "
        "the cores (default 1)",
    )
    parser.add_argument(
        "--whole-set-only",
        action="store_true",
        help="with --digits: leave out the small-data runs",
    )
    parser.add_argument(
        "--subset-steps",
        type=int,
        help="with --digits: the small-data runs' budget (default 3000)",
    )
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {FULL.steps})")
    parser.add_argument(
        "--subsets", type=int, nargs="+", help="numbers of training faces (default 500 2000 10000)"
    )
    parser.add_argument("--augments", nargs="+", help="augment settings (default: all)")
    parser.add_argument(
        "--diffaugment-ops",
        nargs="+",
        metavar="NAME",
        help="DiffAugment's ops for the diffaugment runs (default: the trainer's default)",
    )
    parser.add_argument(
        "--samples", type=int, help=f"images scored per generator (default {FULL.samples})"
    )
    parser.add_argument(
        "--cache-dir", help="where the built-in faces are cached (default: distgan's)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for the JSON, markdown and grids"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the training runs here (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--table", type=Path, metavar="FILE.json", help="print the tables of a saved result"
    )
    parser.add_argument(
        "--train-features",
        action="store_true",
        help="re-train the feature network (deterministic) and write it with its R^2 record",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    with exit_on_user_error():
        if args.table:
            from bench import digits

            saved = json.loads(args.table.read_text())
            print((digits.markdown if "digits" in saved else markdown)(saved), end="")
            return
        if args.digits:
            run_digits_benchmark(args, log)
            return
        if args.train_features:
            record = train_features(cache_dir=args.cache_dir, log=log)
            print(feature_table(record), end="")
            return
        plan = replace(TINY if args.tiny else FULL, **plan_overrides(args))
        info, date = machine(), datetime.date.today().isoformat()
        stem = unused_stem(args.out, result_stem(info, date, plan.tiny))
        samples_dir = args.out / stem
        with tempfile.TemporaryDirectory(prefix="distgan-quality-") as scratch:
            work_dir = args.work_dir or Path(scratch)
            result = run_benchmark(plan, samples_dir, args.cache_dir, work_dir, log)
    result.update(machine=info, date=date)
    table = markdown(result)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print(table, end="")
    print(f"wrote {args.out / stem}.json, {stem}.md and the sample grids in {samples_dir}/")


def run_digits_benchmark(args: argparse.Namespace, log) -> None:
    """`--digits DIR`: bench/digits.py's runs, written and printed like the faces'."""
    from bench import digits  # here: bench/digits.py builds on this module

    plan = digits.TINY if args.tiny else digits.FULL
    if args.subset_steps:
        plan = replace(plan, subset_steps=args.subset_steps)
    if args.whole_set_only:
        plan = replace(plan, subsets=())
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: use 1 or more")
    info, date = machine(), datetime.date.today().isoformat()
    stem = unused_stem(
        args.out, result_stem(info, date, plan.tiny).replace("quality-", "digits-", 1)
    )
    samples_dir = args.out / stem
    result = digits.run_digits(plan, args.digits, samples_dir, log, workers=args.jobs)
    result.update(device=device_name(info), date=date, machine=info)
    table = digits.markdown(result)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print(table, end="")
    print(f"wrote {args.out / stem}.json, {stem}.md and the sample grids in {samples_dir}/")


def plan_overrides(args: argparse.Namespace) -> dict:
    """The Plan fields the command line sets."""
    given = {
        "steps": args.steps,
        "samples": args.samples,
        "subsets": tuple(args.subsets) if args.subsets else None,
        "augments": tuple(args.augments) if args.augments else None,
        "diffaugment_ops": tuple(args.diffaugment_ops) if args.diffaugment_ops else None,
    }
    return {name: value for name, value in given.items() if value is not None}


def feature_table(record: dict) -> str:
    """The feature network's R^2 per parameter group, as a markdown table."""
    lines = [record["what"], "", "| group | R^2 |", "|---|---:|"]
    lines += [f"| {group} | {r2:.3f} |" for group, r2 in record["r2_groups"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
