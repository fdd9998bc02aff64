"""Conditional training end to end, as a user runs it (`python launch/train.py --labels ...`): the
start-up line's images per class, the model's classes in the checkpoint and the generator file, a
sample grid with one row per class, resume from mid-epoch bitwise equal to an uninterrupted
conditional run (from the decoded cache and streamed from the files), a
resume that changes the labels refused, bad label input stopping before any work, and 2 gloo
processes training a conditional run with D's classifier head."""

import json

import numpy as np
import pytest
from PIL import Image

from distgan.outputs.checkpoint import load_generator
from distgan.outputs.report import GRID_PADDING
from tests.helpers import (
    FREQUENT_OUTPUTS,
    SMALL_GAN,
    assert_same_weights,
    run_train,
    two_gloo_processes,
    write_images,
)

pytestmark = pytest.mark.slow


def conditional_run(out, data, *extra):
    return [
        "--data-dir",
        data,
        "--labels",
        "folders",
        "--out-dir",
        out,
        *SMALL_GAN,
        *FREQUENT_OUTPUTS,
        *extra,
    ]


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_a_conditional_run_and_its_bitwise_resume(tmp_path, labelled, cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--decoded-cache", cache)
    result = run_train(*conditional_run(straight, labelled, "--max-steps", "20", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    line = "labels from folders: 4 classes: part0 10, part1 10, part2 10, part3 10"
    assert line in result.stdout
    generator, _ = load_generator(straight / "generator.safetensors")
    assert generator.config.conditioning == "class"
    assert generator.config.classes == ["part0", "part1", "part2", "part3"]
    state = json.loads((straight / "checkpoints/step-00000020/trainer_state.json").read_text())
    assert state["model"]["classes"] == generator.config.classes
    # One row per class, 8 // 4 = 2 images a row.
    grid = np.asarray(Image.open(straight / "samples" / "step-00000020.png"))
    cell = 32 + GRID_PADDING
    assert grid.shape[:2] == (4 * cell + GRID_PADDING, 2 * cell + GRID_PADDING)

    # Stopped mid-epoch (40 images, batch 8: 5 steps an epoch), then resumed to the same end.
    first = run_train(*conditional_run(resumed, labelled, "--max-steps", "7", *flags))
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_train(*conditional_run(resumed, labelled, "--max-steps", "20", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 7 -> 20" in result.stdout
    weights = assert_same_weights(straight, resumed, 20)
    assert any(".embed." in k for k in weights)

    changed = run_train(
        *conditional_run(resumed, labelled, "--max-steps", "30"), "--labels", "none"
    )
    assert changed.returncode == 2
    assert "labels 'folders' -> 'none'" in changed.stderr.strip().splitlines()[-1]


def test_bad_labels_stop_before_any_work(tmp_path, labelled):
    stray = tmp_path / "data"
    write_images(stray, 20, fmt="PNG")
    Image.new("RGB", (8, 8)).save(stray / "stray.png")
    out = tmp_path / "out"
    result = run_train(*conditional_run(out, stray, "--max-steps", "2"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "1 image in" in last and "outside any class folder (stray.png)" in last
    assert "--on-unlabelled skip" in last
    assert not (out / "checkpoints").exists()
    skipped = run_train(*conditional_run(out, stray, "--max-steps", "2", "--on-unlabelled", "skip"))
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "2 classes: part0 10, part1 10 (1 unlabelled image skipped)" in skipped.stdout

    csv = tmp_path / "labels.csv"
    csv.write_text("part0/0000.png,a\nmissing.png,b\n")
    named = run_train(
        *conditional_run(tmp_path / "csv", stray, "--max-steps", "2"), "--labels", csv
    )
    assert named.returncode == 2 and "names 1 file that" in named.stderr
    assert "(missing.png): fix the label file or --data-dir" in named.stderr


def test_two_processes_train_a_conditional_run(tmp_path, labelled):
    out = tmp_path / "ddp"
    flags = ("--max-steps", "10", "--d-classifier")  # the head is reduced with D's other weights
    result = run_train(*conditional_run(out, labelled, *flags), launcher=two_gloo_processes())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "4 classes" in result.stdout
    assert "weights identical on all 2 processes" in result.stdout
    generator, _ = load_generator(out / "generator.safetensors")
    assert generator.config.num_classes == 4
