"""`python -m bench.startup`: how long a user waits for the trainer's answer, wall clock, each
command a fresh `python` as typed: `--help`, and a 1-step run on the built-in faces (rendered and
scanned before the first round), beside `import torch` alone, the floor any torch program pays.
Rounds rotate who goes first; a figure is the median. Prints a markdown table with the goals and
writes bench/results/startup-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.quality import unused_stem
from bench.run import RESULTS_DIR, cpu_model, machine_slug
from distgan.errors import UserError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
GOALS = {"train --help": 1.5, "1-step run": 4.0}  # seconds, issue 21


def commands(data: list[str], runs: Path) -> dict[str, list[str]]:
    """{name: argv} of each timed command; the 1-step run's out dir is filled in per round."""
    return {
        "import torch (the floor)": [sys.executable, "-c", "import torch"],
        "train --help": [sys.executable, TRAIN, "--help"],
        "distgan --help": [sys.executable, "-m", "distgan", "--help"],
        "1-step run": [sys.executable, TRAIN, "--max-steps", "1", *data, "--out-dir", str(runs)],
    }


def run_once(argv: list[str]) -> float:
    """Seconds until `argv` exited; raises with its output's end if it failed."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise UserError(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    return seconds


def measure(data: list[str], rounds: int, workdir: Path) -> dict[str, dict]:
    """{name: {"median": s, "all": [...]}}, after one untimed 1-step run (renders and scans)."""
    work = commands(data, workdir / "warm-up")
    run_once(work["1-step run"])
    seconds: dict[str, list[float]] = {name: [] for name in work}
    names = list(work)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            argv = commands(data, workdir / f"run-{round_index}")[name]
            seconds[name].append(run_once(argv))
    return {
        name: {"median": round(statistics.median(values), 3), "all": [round(v, 3) for v in values]}
        for name, values in seconds.items()
    }


def table(result: dict) -> str:
    lines = ["| command | median s | all rounds | goal |", "|---|---:|---|---|"]
    for name, figure in result["seconds"].items():
        goal, verdict = GOALS.get(name), ""
        if goal is not None:
            verdict = f"≤ {goal} s: {'met' if figure['median'] <= goal else 'NOT met'}"
        rounds = ", ".join(f"{value:.2f}" for value in figure["all"])
        lines.append(f"| {name} | {figure['median']:.2f} | {rounds} | {verdict} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.startup", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--data-dir", help="train on this folder instead of the built-in faces (tests)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_user_error():
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count()}
        date = datetime.date.today().isoformat()
        print(f"timing start-up, {args.rounds} rounds ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="distgan-startup-") as tmp:
            seconds = measure(data, args.rounds, Path(tmp))
        result = {"machine": info, "date": date, "rounds": args.rounds, "data": args.data_dir}
        result["seconds"] = seconds
        print(table(result))
        args.out.mkdir(parents=True, exist_ok=True)
        stem = unused_stem(args.out, f"startup-{machine_slug(info)}-{date}")
        path = args.out / f"{stem}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results in {path}")


if __name__ == "__main__":
    main()
