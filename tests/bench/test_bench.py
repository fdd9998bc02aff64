"""The benchmark harness (bench/): paired, rotating rounds with medians; the peak-memory figure
following real allocations; the reference loop's FLOP count (the issue's 2.48 GFLOP per image)
and the project's leaner step; the trainer's defaults always among the variants; the recipes'
rows training the models of their config files; and a quick end-to-end run writing its JSON and
tables."""

import json
import subprocess
import sys
import time

import pytest
import torch

from bench import run, timing, training
from distgan.config.config import load_toml, load_toml_layers, make_config
from tests.helpers import REPO, run_module


def test_rounds_rotate_and_figures_are_medians():
    calls = []

    def work(name, seconds):
        def run_once():
            calls.append(name)
            time.sleep(seconds)
            return 10

        return run_once

    rates = timing.paired_rates({"a": work("a", 0.01), "b": work("b", 0.03)}, rounds=5)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # who goes first rotates
    for name in "ab":
        assert len(rates[name]["all"]) == 5
        assert rates[name]["median"] == pytest.approx(sorted(rates[name]["all"])[2], abs=0.01)
    assert 200 < rates["b"]["median"] < 350 < rates["a"]["median"] < 1000


def test_peak_memory_follows_a_large_allocation():
    # In a child process: the measurement changes the allocator's settings for good.
    code = (
        "import torch; from bench import timing\n"
        "assert timing.prepare_cpu_memory_measurement()\n"
        "big = timing.peak_memory_mib(lambda: torch.ones(256 * 2**20 // 4).sum(), torch.device('cpu'))\n"
        "small = timing.peak_memory_mib(lambda: torch.ones(1000).sum(), torch.device('cpu'))\n"
        "print(big, small)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    big, small = map(float, result.stdout.split())
    assert 250 <= big <= 280 and small < 8


def test_reference_counts_the_issue_flops_and_the_project_step_fewer():
    cpu = torch.device("cpu")
    reference = training.flops_per_image(training.ReferenceRun(2, cpu))
    project = training.flops_per_image(
        training.TrainerRun(2, cpu, precision="no", channels_last=False, compile=False)
    )
    assert reference == pytest.approx(2.48e9, rel=0.005)
    # D is frozen during G's step: no weight gradients for D there.
    assert 0.85 * reference < project < 0.95 * reference


def test_reference_and_trainer_steps_learn():
    cpu = torch.device("cpu")
    reference = training.ReferenceRun(4, cpu)
    before = [p.clone() for p in reference.model.generator.parameters()]
    losses = reference.model.step(reference.real)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before, reference.model.generator.parameters(), strict=True)
    )
    trainer = training.TrainerRun(4, cpu, precision="bf16", channels_last=True, compile=False)
    before = [p.clone() for p in trainer.gan.generator_core.parameters()]
    assert trainer.steps(2) == 8
    assert all(torch.isfinite(t).all() for t in trainer.last)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before, trainer.gan.generator_core.parameters(), strict=True)
    )


def test_variants_include_the_trainer_defaults_once():
    specs = run.variant_specs(torch.device("cpu"), with_compile=True)
    names = [spec[0] for spec in specs]
    assert sum(name.endswith("(default)") for name in names) == 1
    assert "fp32" in names and any("compile" in name for name in names)
    assert len(set(spec[1:] for spec in specs)) == len(specs)


def test_recipe_rows_train_the_models_of_their_config_files():
    runs = training.recipe_steps(2, torch.device("cpu"), "no")
    recipe = make_config(load_toml(training.DIGITS_RECIPE)).model
    overlay = training.DIGITS_RECIPE.with_name("mnist28-classes.toml")
    labelled = make_config(load_toml_layers([training.DIGITS_RECIPE, overlay]), data_dir="x").model
    clustered = runs["28 px gray, mnist28.toml"].gan.generator_core.config
    assert len(clustered.cluster_shares) == 20 and clustered.g_channels == recipe.g_channels
    conditional = runs["28 px gray, mnist28.toml, 10 classes"].gan.generator_core.config
    assert conditional.classes == [str(d) for d in range(10)]
    # The conditional row's G and D's head are the overlay's (its spectral norm and loss aside).
    for field in ("g_channels", "g_label_gain", "d_channels", "d_classifier", "resolution"):
        assert getattr(conditional, field) == getattr(labelled, field), field
    plain = runs["28 px gray, mnist28.toml without clusters or head"].gan.generator_core.config
    assert not plain.cluster_shares and not plain.d_classifier and not plain.classes


def test_too_few_rounds_are_refused():
    result = run_module("bench", "--rounds", "3")
    assert result.returncode == 2 and "--rounds must be at least 5" in result.stderr


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    result = run_module("bench", "--quick", "--out", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["quick"] is True and data["rounds"] == 5
    assert data["matmul_peak_tflops"]["no"] > 0
    loaders = data["data"]["images_per_sec"]
    assert set(loaders) == {"torchvision", "dali", "dali_cached"}
    assert all(len(v["all"]) == 5 and v["median"] > 0 for v in loaders.values())
    section = data["training"]["8"]
    assert "reference fp32" in section["images_per_sec"]
    assert any(name.endswith("(default)") for name in section["images_per_sec"])
    assert all(m is not None and m > 0 for m in section["peak_memory_mib"].values())
    assert [row["batch"] for row in data["inference"]] == [1, 8]
    assert data["profile"]["top_ops"] and data["profile"]["top_ops"][0]["ms_per_step"] > 0
    assert "| reference fp32 |" in result.stdout and "vs torchvision" in result.stdout
