"""The quality benchmark (bench/quality*.py): the scores behave as scores (coverage of a set by
itself and by far-away points, R^2 of perfect and of mean predictions), the committed feature
network reads the built-in faces' parameters from their pixels, re-training it is deterministic,
bad plans are refused, the default suggested is the best setting that is nowhere worse than
none (with or without the goals met), and a tiny end-to-end run writes its JSON, table and grids with finite
numbers on a sane scale (real faces closer to the reference than noise), under a name of its own
when an earlier run of the day is there."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from bench import quality_features
from bench.quality import FULL, TINY, evaluate_goals, recommend
from bench.quality_features import (
    FaceParameterNet,
    load_images,
    load_net,
    mirror,
    parameters_of,
    predict,
    r_squared,
    train_features,
)
from bench.quality_metrics import coverage
from distgan.data.faces import PARAMETER_GROUPS, PARAMETER_NAMES, builtin_faces_dir
from distgan.data.folder import find_images
from distgan.errors import UserError
from tests.helpers import run_module


def test_coverage_is_one_for_the_reference_itself_and_zero_far_away():
    points = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert coverage(points, points) == 1.0
    assert coverage(points, points + 100) == 0.0
    # A reference of two kinds of points, and a generator that makes only one of them.
    two_kinds = torch.cat([points[:100], points[100:] + 50])
    assert coverage(two_kinds, torch.cat([points[:50], points[:50] + 0.01])) == 0.5
    fresh = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    assert coverage(points, fresh) > 0.9  # another sample of the same distribution


def test_r_squared_is_one_for_perfect_and_zero_for_mean_predictions():
    target = torch.randn(300, len(PARAMETER_NAMES), generator=torch.Generator().manual_seed(1))
    perfect = r_squared(target, target)
    assert set(perfect["groups"]) == set(PARAMETER_GROUPS)
    assert all(v == pytest.approx(1.0) for v in perfect["groups"].values())
    mean = r_squared(target.mean(0).expand_as(target), target)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in mean["parameters"].values())


def test_mirroring_negates_only_the_sideways_parameters():
    raw = parameters_of(range(5))
    mirrored = mirror(raw)
    changed = {PARAMETER_NAMES[i] for i in torch.nonzero((mirrored != raw).any(0)).flatten()}
    assert changed == {"head_x", "yaw", "gaze", "roll"}
    assert torch.equal(mirror(mirrored), raw)


def test_committed_network_reads_the_faces(faces_cache):
    """The shipped weights, on built-in faces through the training pipeline: colours and the
    head's geometry are read well (far better than the mean), and features are finite."""
    files = find_images(builtin_faces_dir(240, 128, faces_cache))
    images = load_images(files)
    net = load_net()
    quality = r_squared(predict(net, images), net.normalise(parameters_of(range(len(files)))))
    for group in ("background", "head", "skin", "hair", "pose"):
        assert quality["groups"][group] > 0.85, (group, quality["groups"])
    assert quality["groups"]["eyes"] > 0.6 and quality["groups"]["mouth"] > 0.5
    features = quality_features.features(net, images)
    assert features.shape == (240, quality_features.FEATURES) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="uint8"):
        net.features(images.float())


def test_committed_weights_are_small_and_safetensors():
    assert quality_features.WEIGHTS_FILE.stat().st_size < 2**20
    state = load_file(str(quality_features.WEIGHTS_FILE))
    assert set(state) == set(FaceParameterNet().state_dict())
    record = json.loads(quality_features.RECORD_FILE.read_text())
    assert set(record["r2_groups"]) == set(PARAMETER_GROUPS)


def test_feature_training_is_deterministic(tmp_path):
    options = dict(cache_dir=tmp_path / "cache", faces=range(10_000, 10_064), held_out=32)
    weights = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        record = train_features(**options, epochs=2, out=out, log=lambda line: None)
        weights.append(load_file(str(out)))
        assert all(math.isfinite(v) for v in record["r2_groups"].values())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "a.json").is_file()


def test_bad_plans_are_refused():
    with pytest.raises(UserError, match="none among them"):
        replace(TINY, augments=("diffaugment",))
    with pytest.raises(UserError, match="multiple of 4"):
        replace(TINY, steps=2)
    with pytest.raises(UserError, match="multiple of 4"):
        replace(TINY, steps=22)
    with pytest.raises(UserError, match="diffaugment_ops=\\['flip'\\] is not allowed"):
        replace(TINY, diffaugment_ops=("flip",))
    result = run_module("bench.quality", "--tiny", "--samples", "500")
    assert result.returncode == 2 and "--samples 500 is more than half" in result.stderr


def runs_with(fds: dict, plan) -> list[dict]:
    """Benchmark run records with FD `fds[(subset, augment)]` (the same at every scored step)."""
    return [
        {
            "images": subset,
            "augment": augment,
            "scores": {str(at): {"ema": {"fd": fd}} for at in plan.scored_steps},
        }
        for (subset, augment), fd in fds.items()
    ]


def test_the_default_is_the_best_setting_nowhere_worse_than_none():
    plan = replace(FULL, augments=("none", "diffaugment", "ada"))
    better = {(s, "none"): 70.0 for s in plan.subsets}
    better |= {(s, "diffaugment"): 60.0 for s in plan.subsets}  # better, not 2x
    better |= {(s, "ada"): 50.0 for s in plan.subsets}
    better[10_000, "ada"] = 71.0  # the best on average, but worse than none on one subset
    runs = runs_with(better, plan)
    assert recommend(runs, evaluate_goals(runs, plan), plan) == {
        "default": "diffaugment",
        "meets_goals": False,
        "best_fd": "ada",
    }
    worse = better | {(10_000, "diffaugment"): 70.5}
    runs = runs_with(worse, plan)
    assert recommend(runs, evaluate_goals(runs, plan), plan)["default"] == "none"


@pytest.mark.slow
def test_tiny_run_writes_a_sane_result(tmp_path, faces_cache):
    out = tmp_path / "results"
    out.mkdir()
    result = run_module(
        "bench.quality", "--tiny", "--out", out, "--cache-dir", faces_cache, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("quality-*-tiny.json")
    data = json.loads(path.read_text())
    scale = data["scale"]
    assert scale["real"]["fd"] < scale["noise"]["fd"]
    assert scale["real"]["coverage"] > scale["noise"]["coverage"]
    assert [(r["images"], r["augment"]) for r in data["runs"]] == [
        (64, "none"),
        (64, "diffaugment"),
    ]
    for run in data["runs"]:
        assert list(run["scores"]) == ["5", "10", "15", "20"]  # each quarter of TINY's 20 steps
        for at, kinds in run["scores"].items():
            assert set(kinds) == ({"ema", "ema_bn"} if at == "20" else {"ema"})
            for scores in kinds.values():
                assert math.isfinite(scores["fd"]) and scores["fd"] >= 0
                assert 0 <= scores["coverage"] <= 1
        assert (out / run["grid"]).is_file()
    assert set(data["goals"]) == {"none", "diffaugment"}
    assert data["recommendation"]["default"] in ("none", "diffaugment")
    table = path.with_suffix(".md").read_text()
    assert "Recommended default: --augment" in table and table in result.stdout
    reprinted = run_module("bench.quality", "--table", path)
    assert reprinted.returncode == 0 and reprinted.stdout == table


def test_a_second_run_on_the_same_day_keeps_the_first_ones_files(tmp_path):
    from bench.quality import unused_stem

    assert unused_stem(tmp_path, "quality-x-2026-12-07") == "quality-x-2026-12-07"
    (tmp_path / "quality-x-2026-12-07.json").write_text("{}")
    assert unused_stem(tmp_path, "quality-x-2026-12-07") == "quality-x-2026-12-07-2"
    (tmp_path / "quality-x-2026-12-07-2").mkdir()  # its grids, even without a JSON yet
    assert unused_stem(tmp_path, "quality-x-2026-12-07") == "quality-x-2026-12-07-3"
