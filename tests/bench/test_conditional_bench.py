"""The class-conditional digits benchmark (`python -m bench.conditional --digits DIR`): a tiny run
on drawn digits in one subfolder per digit trains both runs, scores them on the same scale (the
conditional one with per-class accuracy for every digit), writes its JSON, table and grids, and
states every goal; a folder not laid out by digit is refused in one line."""

import json
import math

from bench.conditional import class_accuracy, digit_labels
from bench.digit_metrics import load_digit_folder
from bench.digit_scorer import load_scorer
from tests.helpers import run_module, write_digits


def by_digit(folder, count: int):
    """write_digits' drawings, moved into one subfolder per digit."""
    write_digits(folder, count)
    for path in sorted(folder.glob("*.png")):
        digit = folder / str(int(path.stem) % 10)
        digit.mkdir(exist_ok=True)
        path.rename(digit / path.name)
    return folder


def test_labels_follow_the_folders_and_the_scorer_reads_drawn_digits(tmp_path):
    folder = by_digit(tmp_path / "digits", 60)
    labels = digit_labels(folder)
    assert labels.tolist() == [i % 10 for i in range(60)]  # in load_digit_folder's order
    accuracy = class_accuracy(load_scorer(), load_digit_folder(folder), labels)
    assert len(accuracy) == 10 and sum(accuracy) / 10 > 0.5  # drawn, not handwritten


def test_tiny_conditional_run_writes_every_goal(tmp_path):
    folder = by_digit(tmp_path / "digits", 160)
    out = tmp_path / "results"
    out.mkdir()
    args = ["--digits", folder, "--tiny", "--epochs", "1", "--samples", "40", "--per-class", "4"]
    result = run_module("bench.conditional", *args, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("conditional-*-tiny.json")
    data = json.loads(path.read_text())
    assert list(data["runs"]) == [
        "unconditional",
        "unconditional, same batch",
        "conditional",
    ]
    runs = data["runs"]
    assert runs["unconditional, same batch"]["batch_size"] == runs["conditional"]["batch_size"]
    assert runs["unconditional"]["batch_size"] == 64 > runs["conditional"]["batch_size"]
    assert data["runs"]["conditional"]["settings"] == {"overlays": ["mnist28-classes.toml"]}
    assert len(data["runs"]["conditional"]["class_accuracy"]) == 10
    assert "class_accuracy" not in data["runs"]["unconditional"]
    assert all(math.isfinite(run["fd"]) for run in data["runs"].values())
    table = path.with_suffix(".md").read_text()
    assert "| accuracy >= 95% |" in table and "| FD no worse than unconditional |" in table
    assert {p.name for p in (out / path.stem).iterdir()} == {
        "unconditional.png",
        "unconditional-same-batch.png",
        "conditional.png",
    }


def test_a_flat_folder_is_refused(tmp_path):
    write_digits(tmp_path / "flat", 20)
    result = run_module("bench.conditional", "--digits", tmp_path / "flat", "--tiny")
    assert result.returncode == 2
    assert "not one subfolder per digit: write it with mnist_folder.py --by-class" in result.stderr
