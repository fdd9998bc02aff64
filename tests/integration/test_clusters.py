"""Self-conditioning end to end, as a user runs it (`python launch/train.py --clusters K`): the
start-up lines, OUT/clusters.csv, an unconditional generator file that knows its clusters'
shares, resume bitwise equal to an uninterrupted run (reading the clusters file again), a resume
without that file or with another --clusters refused, too few images refused before any work,
and 2 gloo processes training a self-conditioned run with D's classifier head."""

import pytest

from distgan.outputs.checkpoint import load_generator
from tests.helpers import (
    FREQUENT_OUTPUTS,
    SMALL_GAN,
    assert_same_weights,
    run_train,
    two_gloo_processes,
)

pytestmark = pytest.mark.slow


def clustered_run(out, data, *extra):
    return [
        "--data-dir",
        data,
        "--clusters",
        "3",
        "--out-dir",
        out,
        *SMALL_GAN,
        *FREQUENT_OUTPUTS,
        *extra,
    ]


def test_a_self_conditioned_run_and_its_bitwise_resume(tmp_path, labelled):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train(*clustered_run(straight, labelled, "--max-steps", "20"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clustering 40 images into 3 (once)" in result.stdout
    assert "self-conditioned on 3 clusters: 0 " in result.stdout
    rows = (straight / "clusters.csv").read_text().splitlines()
    assert rows[0] == "file,class" and len(rows) == 41
    generator, _ = load_generator(straight / "generator.safetensors")
    config = generator.config
    assert config.classes == [] and len(config.cluster_shares) == 3
    assert abs(sum(config.cluster_shares) - 1) < 1e-6

    # Stopped mid-epoch, then resumed to the same end: the clusters are read back, not redone.
    first = run_train(*clustered_run(resumed, labelled, "--max-steps", "7"))
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_train(*clustered_run(resumed, labelled, "--max-steps", "20"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 7 -> 20" in result.stdout and "clustering" not in result.stdout
    weights = assert_same_weights(straight, resumed, 20)
    assert any(".embed." in k for k in weights)  # G's per-cluster gains and biases

    other = run_train(*clustered_run(resumed, labelled, "--max-steps", "30"), "--clusters", "4")
    assert other.returncode == 2
    assert "clusters 3 -> 4" in other.stderr.strip().splitlines()[-1]
    (resumed / "clusters.csv").unlink()
    missing = run_train(*clustered_run(resumed, labelled, "--max-steps", "30"))
    assert missing.returncode == 2
    assert "clusters.csv is missing: resume in that run's --out-dir" in missing.stderr


def test_too_few_images_stop_before_any_work(tmp_path, labelled):
    out = tmp_path / "out"
    result = run_train(*clustered_run(out, labelled, "--max-steps", "2"), "--clusters", "50")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--clusters 50 needs at least 50 images, and the data has 40: lower" in last
    assert not (out / "checkpoints").exists()


def test_two_processes_train_a_self_conditioned_run(tmp_path, labelled):
    out = tmp_path / "ddp"
    flags = ("--max-steps", "10", "--d-classifier")
    result = run_train(*clustered_run(out, labelled, *flags), launcher=two_gloo_processes())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "3 clusters" in result.stdout
    assert result.stdout.count("clustering 40 images") == 1  # the main process alone
    assert "weights identical on all 2 processes" in result.stdout
    generator, _ = load_generator(out / "generator.safetensors")
    assert len(generator.config.cluster_shares) == 3
