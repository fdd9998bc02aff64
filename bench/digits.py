"""`python -m bench.quality --digits FOLDER`: the course's first workload, real MNIST digits at
28 px, scored by a digit classifier (bench/digit_scorer.py, bench/digit_metrics.py).

Runs, each scored on EMA samples (the reference loop has no EMA: its G) from one fixed z:
- distgan's digits recipe (`launch/configs/mnist28.toml`) on every digit of FOLDER, scored every
  `curve_epochs` epochs up to the longest budget (the learning rates are constant, so the
  5-epoch checkpoint is what a 5-epoch run ends with);
- the reference loop (bench/reference_dcgan.py: pytorch/examples' dcgan, at 28 px) on the same
  digits, the same epochs, batch and shapes;
- small data: the recipe with `--augment diffaugment` and with `--augment none` on the first 500
  and 2,000 digits; the recipe's own choice there (`augment = "auto"`: by the data's size) is
  one of the two, and the goal compares it with none.

Scale lines put the numbers in context: real digits the reference does not hold (the floor), the
same blurred by a 3x3 box filter (the goals' unit) and uniform noise. Writes
bench/results/digits-<machine>-<date>.json and .md with a grid per run, and prints the tables
with the goals beside them.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.digit_metrics import DigitReference, blurred, load_digit_folder
from bench.digit_scorer import RECORD_FILE, RESOLUTION, load_scorer
from bench.quality import ema_generators, generate
from bench.reference_dcgan import ReferenceDCGAN, make_generator
from distgan.config.config import load_toml_layers, make_config
from distgan.config.model import ModelConfig
from distgan.data.folder import find_images
from distgan.data.order import steps_per_epoch
from distgan.errors import UserError
from distgan.models.dcgan import sample_latents
from distgan.outputs.report import save_grid
from distgan.runtime.env import available_cpus
from distgan.training.precision import resolve_mixed_precision
from distgan.training.trainer import train

RECIPE_FILE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "mnist28.toml"
SAMPLE_SEED = 1234  # the z of every scored sample set
GRID_IMAGES = 64
BLUR_UNIT = "blurred"  # the scale line the goals are stated in


@dataclass(frozen=True, kw_only=True)
class DigitPlan:
    """What one digits benchmark trains and scores."""

    epochs: tuple[int, ...]  # the budgets the goals are stated at (epochs over every digit)
    curve_epochs: int  # the whole-set runs are scored every this many epochs
    batch_size: int
    subsets: tuple[int, ...]  # small-data runs on the first N digits
    subset_steps: int  # their budget, scored at each quarter
    samples: int  # images per scored set; the reference holds the digits after the first half
    tiny: bool = False

    def __post_init__(self) -> None:
        if any(e % self.curve_epochs for e in self.epochs):
            raise UserError(f"epochs={self.epochs}: use multiples of {self.curve_epochs}")
        if self.subset_steps % 4:
            raise UserError(f"--subset-steps {self.subset_steps}: use a multiple of 4")

    @property
    def scored_epochs(self) -> tuple[int, ...]:
        return tuple(range(self.curve_epochs, max(self.epochs) + 1, self.curve_epochs))

    @property
    def subset_scored_steps(self) -> tuple[int, ...]:
        return tuple(self.subset_steps * k // 4 for k in range(1, 5))


# The goals: 10,000 digits, 5 and 25 epochs, batch 64; 500 and 2,000 digits, 3,000 steps.
FULL = DigitPlan(
    epochs=(5, 25),
    curve_epochs=5,
    batch_size=64,
    subsets=(500, 2_000),
    subset_steps=3_000,
    samples=5_000,
)
# CI: the same code on a folder of a few hundred generated digits.
TINY = DigitPlan(
    epochs=(1, 2),
    curve_epochs=1,
    batch_size=16,
    subsets=(48,),
    subset_steps=8,
    samples=64,
    tiny=True,
)

# The goals, each stated as a bound on a ratio or a score.
GOAL_BLUR_RATIO = {5: 0.5, 25: 0.25}  # FD <= this x the blurred real digits' FD, by epochs
GOAL_ENTROPY, GOAL_CONFIDENCE = 2.25, 0.9
GOAL_OVER_REFERENCE = 3.0  # reference FD / recipe FD at the same epochs
GOAL_OVER_NONE = 1.5  # small data: --augment none FD / the recipe's FD
SMALL_DATA_AUGMENTS = ("diffaugment", "none")  # the recipe with each, on the small subsets


def recipe_config(
    out_dir: Path, data_dir: Path, steps: int, every: int, tiny: bool, overlays=(), **overrides
):
    """The trainer's config for one run: the digits recipe file (and `overlays`, config files
    over it, in turn), the budget and outputs."""
    sections = load_toml_layers([RECIPE_FILE, *overlays])
    small = {"g_channels": 16, "d_channels": 16} if tiny else {}
    return make_config(
        sections,
        out_dir=str(out_dir),
        data_dir=str(data_dir),
        resume="none",
        max_steps=steps,
        seed=0,
        log_every=min(50, every),
        sample_every=steps,
        ckpt_every=every,
        keep_checkpoints=100,
        report_to="none",
        **small,
        **overrides,
    )


class Scoring:
    """The scorer, the reference digits, the fixed z and where the grids go."""

    def __init__(self, digits: torch.Tensor, plan: DigitPlan, grids: Path):
        self.reference = DigitReference.of(
            load_scorer(), digits[len(digits) // 2 :], coverage_count=plan.samples
        )
        self.z = sample_latents(
            ModelConfig(resolution=RESOLUTION, channels=1),
            plan.samples,
            generator=torch.Generator().manual_seed(SAMPLE_SEED),
        )
        self.grids = grids

    def score(self, generator, grid_name: str | None = None) -> dict:
        images = generate(generator, self.z)
        if grid_name:
            save_grid(images[:GRID_IMAGES].float() / 127.5 - 1, self.grids / f"{grid_name}.png")
        return self.reference.score(images)


@dataclass(frozen=True, kw_only=True)
class Job:
    """One training of the benchmark: distgan's trainer ("trainer") or the reference loop."""

    name: str
    kind: str
    data_dir: Path
    steps: int
    scored: tuple[int, ...]  # steps whose generator is scored
    grid_at: tuple[int, ...]  # steps whose samples are saved as a grid
    overrides: tuple = ()  # (field, value) pairs over the recipe file
    images: int | None = None  # small-data runs: the subset's size


def run_job(job: Job, plan: DigitPlan, work_dir: Path, threads: int) -> float:
    """Train `job` (in a worker process of its own, on `threads` threads), its generators saved
    under work_dir/name at the scored steps; the training seconds."""
    torch.set_num_threads(threads)
    run_dir = work_dir / job.name
    start = time.perf_counter()
    if job.kind == "trainer":
        every = job.scored[0]
        overrides = dict(job.overrides)
        train(recipe_config(run_dir, job.data_dir, job.steps, every, plan.tiny, **overrides))
    else:
        train_reference(job, plan, run_dir)
    return time.perf_counter() - start


def train_reference(job: Job, plan: DigitPlan, run_dir: Path) -> None:
    """The reference loop on the digits, shuffled each epoch by a fixed seed; its G (it keeps
    no EMA) saved at every scored step."""
    real = load_digit_folder(job.data_dir).float() / 127.5 - 1
    model = ReferenceDCGAN(torch.device("cpu"), seed=0, channels=1, resolution=RESOLUTION)
    order = torch.Generator().manual_seed(0)
    run_dir.mkdir(parents=True)
    step = 0
    while step < job.steps:
        permutation = torch.randperm(len(real), generator=order)
        for first in range(0, len(real), plan.batch_size):
            model.step(real[permutation[first : first + plan.batch_size]])
            step += 1
        if step in job.scored:
            weights = {k: v.contiguous() for k, v in model.generator.state_dict().items()}
            save_file(weights, str(run_dir / f"reference-{step}.safetensors"))


def generators_of(job: Job, work_dir: Path) -> dict:
    """The generator of `job` at each scored step, in eval mode, taking z [N, 100]."""
    run_dir = work_dir / job.name
    if job.kind == "trainer":
        return ema_generators(run_dir, job.scored)
    found = {}
    for at in job.scored:
        net = make_generator(channels=1, resolution=RESOLUTION)
        net.load_state_dict(load_file(str(run_dir / f"reference-{at}.safetensors")))
        net.eval().requires_grad_(False)
        found[at] = lambda z, net=net: net(z[:, :, None, None])
    return found


def run_jobs(jobs: list[Job], plan: DigitPlan, work_dir: Path, workers: int) -> dict:
    """Every job's training seconds, `workers` at a time (longest first), each worker on its
    share of the cores."""
    threads = max(1, available_cpus() // workers)
    if workers == 1:
        return {job.name: run_job(job, plan, work_dir, threads) for job in jobs}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        ordered = sorted(jobs, key=lambda job: -job.steps)
        futures = {job.name: pool.submit(run_job, job, plan, work_dir, threads) for job in ordered}
        return {name: future.result() for name, future in futures.items()}


def log_curve(name: str, scores: dict, seconds: float) -> None:
    """One line per run as it ends, so a long benchmark shows its results as it goes."""
    curve = ", ".join(
        f"{at}: FD {s['fd']:.2f} H {s['entropy']:.3f} conf {s['confidence']:.3f}"
        for at, s in scores.items()
    )
    print(f"  {name} ({seconds:.0f} s): {curve}", flush=True)


def subset_folder(files: list[str], count: int, root: Path) -> Path:
    """A folder of links to the first `count` digits."""
    folder = root / f"first-{count}"
    folder.mkdir(parents=True)
    for path in files[:count]:
        (folder / Path(path).name).symlink_to(Path(path).resolve())
    return folder


def run_digits(plan: DigitPlan, data_dir: Path, grids: Path, log, workers: int = 1) -> dict:
    """Train and score every run of `plan` on the digits in `data_dir`."""
    started = time.perf_counter()
    files = sorted(find_images(data_dir), key=lambda path: (Path(path).name, path))
    digits = load_digit_folder(data_dir)
    if len(digits) < 2 * plan.samples or len(digits) < max(plan.subsets, default=0):
        raise UserError(
            f"{data_dir} holds {len(digits)} digits: the plan needs {2 * plan.samples} (its "
            f"samples twice) and at least {max(plan.subsets, default=0)}"
        )
    grids.mkdir(parents=True, exist_ok=True)
    scoring = Scoring(digits, plan, grids)
    floor = digits[: plan.samples]
    noise = torch.randint(
        0, 256, floor.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    scale = {
        "real": scoring.reference.score(floor),
        BLUR_UNIT: scoring.reference.score(blurred(floor)),
        "noise": scoring.reference.score(noise),
    }
    log(f"scale: real {scale['real']['fd']:.2f}, blurred {scale[BLUR_UNIT]['fd']:.2f}")
    per_epoch = steps_per_epoch(len(digits), 1, plan.batch_size)  # every run is one process
    scored = tuple(e * per_epoch for e in plan.scored_epochs)
    goal_steps = tuple(e * per_epoch for e in plan.epochs)
    with tempfile.TemporaryDirectory(prefix="distgan-digits-") as scratch:
        work = Path(scratch)
        whole = {"data_dir": Path(data_dir), "steps": scored[-1], "scored": scored}
        jobs = [
            Job(name="recipe", kind="trainer", grid_at=goal_steps, **whole),
            Job(name="reference", kind="reference", grid_at=goal_steps, **whole),
        ]
        steps = plan.subset_scored_steps
        for count in plan.subsets:
            folder = subset_folder(files, count, work / "data")
            for augment in SMALL_DATA_AUGMENTS:
                jobs.append(
                    Job(
                        name=f"{count}-{augment}",
                        kind="trainer",
                        data_dir=folder,
                        steps=steps[-1],
                        scored=steps,
                        grid_at=(steps[-1],),
                        overrides=(("augment", augment),),
                        images=count,
                    )
                )
        log(f"{len(jobs)} trainings, {workers} at a time: {', '.join(j.name for j in jobs)} ...")
        seconds = run_jobs(jobs, plan, work, workers)
        runs = []
        for job in jobs:
            scores = {
                str(at): scoring.score(g, f"{job.name}-{at}" if at in job.grid_at else None)
                for at, g in generators_of(job, work).items()
            }
            log_curve(job.name, scores, seconds[job.name])
            run = {"name": job.name, "train_seconds": round(seconds[job.name], 1)}
            runs.append(run | {"scores": scores} | ({"images": job.images} if job.images else {}))
    result = {
        "plan": asdict(plan),
        "digits": len(digits),
        "steps_per_epoch": per_epoch,
        "recipe": str(RECIPE_FILE.relative_to(RECIPE_FILE.parents[2])),
        "precision": resolve_mixed_precision("auto"),
        "scorer": read_record(),
        "scale": scale,
        "runs": runs,
        "recipe_augment": {str(n): recipe_augment(n) for n in plan.subsets},
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["goals"] = goals(result)
    return result


def read_record() -> dict:
    return json.loads(RECORD_FILE.read_text()) if RECORD_FILE.is_file() else {}


def goals(result: dict) -> list[dict]:
    """Each goal of the plan: what it bounds, the measured value, the bound, met or not."""
    plan, per_epoch = result["plan"], result["steps_per_epoch"]
    runs = {run["name"]: run for run in result["runs"]}
    unit = result["scale"][BLUR_UNIT]["fd"]
    checks = []
    for epochs in plan["epochs"]:
        at = str(epochs * per_epoch)
        mine, theirs = runs["recipe"]["scores"][at], runs["reference"]["scores"][at]
        bound = GOAL_BLUR_RATIO.get(epochs)
        if bound is not None:
            checks.append(
                check(f"{epochs} epochs: FD / blurred FD", mine["fd"] / unit, "<=", bound)
            )
        checks.append(check(f"{epochs} epochs: class entropy", mine["entropy"], ">=", GOAL_ENTROPY))
        checks.append(
            check(f"{epochs} epochs: confidence", mine["confidence"], ">=", GOAL_CONFIDENCE)
        )
        ratio = theirs["fd"] / mine["fd"]
        checks.append(
            check(f"{epochs} epochs: reference FD / recipe FD", ratio, ">=", GOAL_OVER_REFERENCE)
        )
    last = str(plan["subset_steps"])
    for count in plan["subsets"]:
        chosen = result["recipe_augment"][str(count)]
        none, recipe = (runs[f"{count}-{a}"]["scores"][last]["fd"] for a in ("none", chosen))
        goal = f"{count} digits, {last} steps: none FD / the recipe's FD (its augment: {chosen})"
        checks.append(check(goal, none / recipe, ">=", GOAL_OVER_NONE))
    return checks


def recipe_augment(images: int) -> str:
    """What the recipe's D sees on `images` digits (its augment=auto, resolved by their count)."""
    return make_config(load_toml_layers([RECIPE_FILE])).train.augment_for(images)


def check(goal: str, value: float, relation: str, bound: float) -> dict:
    met = value <= bound if relation == "<=" else value >= bound
    return {"goal": goal, "value": value, "relation": relation, "bound": bound, "met": met}


def markdown(result: dict) -> str:
    """The tables of a digits result: the scale, every run's curve, the goals."""
    plan = result["plan"]
    per_epoch = result["steps_per_epoch"]
    lines = [
        f"### Quality: {result['digits']} digits at 28 px, batch {plan['batch_size']}, "
        f"{result['precision']}, {plan['samples']} samples per score"
        + (" (tiny: a smoke test, not a measurement)" if plan["tiny"] else ""),
        "",
        f"`python -m bench.quality --digits DIR{' --tiny' if plan['tiny'] else ''}`, "
        f"{result['date']}, {result['device']}; {result['seconds']:.0f} s. Recipe: "
        f"`{result['recipe']}`. Scorer: held-out accuracy "
        f"{result['scorer'].get('held_out_accuracy', float('nan')):.4f}. FD: Fréchet distance in "
        "the scorer's features; entropy: of the mean class distribution (max ln 10 = 2.303); "
        "confidence: mean top-class probability; coverage: in the scorer's features (k = 5).",
        "",
        "| scale | FD | entropy | confidence | coverage |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "real": "real digits (the floor)",
        BLUR_UNIT: "real digits blurred 3x3 (the goals' unit)",
        "noise": "uniform noise",
    }
    for name, s in result["scale"].items():
        lines.append(f"| {names[name]} | {row(s)} |")
    lines += [
        "",
        "| run | epochs | steps | FD | FD / blurred | entropy | confidence | coverage |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    unit = result["scale"][BLUR_UNIT]["fd"]
    for run in result["runs"]:
        for at, s in run["scores"].items():
            at = int(at)
            epochs = f"{at / per_epoch:g}" if "images" not in run else ""
            lines.append(
                f"| {run['name']} | {epochs} | {at} | {s['fd']:.2f} | {s['fd'] / unit:.3f} | "
                f"{s['entropy']:.3f} | {s['confidence']:.3f} | {s['coverage']:.3f} |"
            )
    lines += ["", "| goal | measured | bound | met |", "|---|---:|---:|---|"]
    for c in result["goals"]:
        met = "yes" if c["met"] else "no"
        lines.append(f"| {c['goal']} | {c['value']:.3f} | {c['relation']} {c['bound']:g} | {met} |")
    seconds = ", ".join(f"{run['name']} {run['train_seconds']:.0f} s" for run in result["runs"])
    lines += ["", f"Training time: {seconds}."]
    return "\n".join(lines) + "\n"


def row(s: dict) -> str:
    return f"{s['fd']:.2f} | {s['entropy']:.3f} | {s['confidence']:.3f} | {s['coverage']:.3f}"
