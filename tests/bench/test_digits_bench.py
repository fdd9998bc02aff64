"""The digits quality benchmark (bench/digit*.py, `python -m bench.quality --digits DIR`): the
committed digit scorer loads and reproduces its recorded accuracy on the committed held-out
digits; the scores behave as scores (entropy of ten equal classes and of one, a blur moves the
distance, noise is far); the reference loop builds 28 px grayscale shapes; bad folders and plans
are refused; and a tiny end-to-end run on generated digits writes its JSON, table and grids, with
every goal evaluated and real digits closer than noise."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench import digit_scorer
from bench.digit_metrics import DigitReference, blurred, entropy, load_digit_folder
from bench.digits import TINY
from bench.reference_dcgan import ReferenceDCGAN
from distgan.errors import UserError
from tests.helpers import run_module, write_digits


def test_committed_scorer_reproduces_its_recorded_accuracy():
    record = json.loads(digit_scorer.RECORD_FILE.read_text())
    assert record["held_out_accuracy"] >= 0.98
    data = np.load(digit_scorer.HELD_OUT_FILE)
    images = torch.from_numpy(data["images"]).unsqueeze(1)
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    assert len(images) == record["committed_held_out_digits"]
    net = digit_scorer.load_scorer()
    assert digit_scorer.accuracy(net, images, labels) == record["committed_held_out_accuracy"]
    with pytest.raises(ValueError, match="uint8"):
        net.features(images.float())


def test_scores_behave_as_scores():
    uniform = torch.full((10, 10), 0.1)
    assert entropy(uniform) == pytest.approx(math.log(10))
    assert entropy(torch.eye(10)[[3] * 10]) == pytest.approx(0.0, abs=1e-9)
    data = np.load(digit_scorer.HELD_OUT_FILE)
    digits = torch.from_numpy(data["images"]).unsqueeze(1)
    reference = DigitReference.of(digit_scorer.load_scorer(), digits[250:], coverage_count=250)
    real, soft = reference.score(digits[:250]), reference.score(blurred(digits[:250]))
    noise = torch.randint(0, 256, (250, 1, 28, 28), dtype=torch.uint8)
    far = reference.score(noise)
    assert real["fd"] < soft["fd"] < far["fd"]
    assert real["confidence"] > 0.95 and real["entropy"] > 2.2 and real["coverage"] > 0.8
    assert far["coverage"] < 0.1 and sum(real["classes"]) == 250


def test_blur_is_a_3x3_box_filter():
    image = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    image[0, 0, 2, 2] = 90
    out = blurred(image)[0, 0]
    assert out[1:4, 1:4].eq(10).all() and out.sum() == 90


def test_reference_loop_at_28_px_makes_grayscale_digits():
    model = ReferenceDCGAN(torch.device("cpu"), channels=1, resolution=28)
    fake = model.generator(torch.randn(4, 100, 1, 1))
    assert fake.shape == (4, 1, 28, 28)
    assert model.discriminator(fake).shape == (4, 1, 1, 1)
    losses = model.step(torch.rand(4, 1, 28, 28) * 2 - 1)
    assert all(math.isfinite(v) for v in losses.values())


def test_folders_of_other_sizes_and_bad_plans_are_refused(tmp_path):
    write_digits(tmp_path / "big", 3, size=32)
    with pytest.raises(UserError, match="32x32: the digits benchmark takes 28x28"):
        load_digit_folder(tmp_path / "big")
    with pytest.raises(UserError, match="multiples of 2"):
        replace(TINY, epochs=(3,), curve_epochs=2)
    write_digits(tmp_path / "few", 20)
    result = run_module("bench.quality", "--digits", tmp_path / "few", "--tiny")
    assert result.returncode == 2 and "holds 20 digits: the plan needs 128" in result.stderr


@pytest.mark.slow
def test_tiny_digits_run_writes_every_goal(tmp_path):
    write_digits(tmp_path / "digits", 160)
    out = tmp_path / "results"
    out.mkdir()
    result = run_module(
        "bench.quality", "--digits", tmp_path / "digits", "--tiny", "--out", out, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("digits-*-tiny.json")
    data = json.loads(path.read_text())
    scale = data["scale"]
    assert scale["real"]["fd"] < scale["noise"]["fd"]
    assert [run["name"] for run in data["runs"]] == [
        "recipe",
        "reference",
        "48-diffaugment",
        "48-none",
    ]
    per_epoch = data["steps_per_epoch"]
    assert per_epoch == 10  # 160 digits, batch 16
    for run in data["runs"][:2]:
        assert list(run["scores"]) == ["10", "20"]  # every epoch, to the longest budget
    for run in data["runs"][2:]:
        assert list(run["scores"]) == ["2", "4", "6", "8"]  # each quarter of 8 steps
    for run in data["runs"]:
        for scores in run["scores"].values():
            assert math.isfinite(scores["fd"]) and 0 <= scores["confidence"] <= 1
    goals = [goal["goal"] for goal in data["goals"]]
    assert goals[:4] == [
        "1 epochs: class entropy",
        "1 epochs: confidence",
        "1 epochs: reference FD / recipe FD",
        "2 epochs: class entropy",
    ]
    # The recipe's augment=auto gives 48 digits DiffAugment: the goal compares that run.
    assert data["recipe_augment"] == {"48": "diffaugment"}
    assert goals[-1] == "48 digits, 8 steps: none FD / the recipe's FD (its augment: diffaugment)"
    grids = {p.name for p in (out / path.stem).iterdir()}
    assert {"recipe-10.png", "recipe-20.png", "reference-10.png", "48-none-8.png"} <= grids
    table = path.with_suffix(".md").read_text()
    assert table in result.stdout and "| goal | measured | bound | met |" in table
    reprinted = run_module("bench.quality", "--table", path)
    assert reprinted.returncode == 0 and reprinted.stdout == table
