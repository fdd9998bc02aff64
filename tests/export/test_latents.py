"""Latents by seed (export/latents.py): a seed's z depends on that seed alone (not on the other
seeds, their order or how many), normal z looks like N(0, 1) and uniform z like U[-1, 1], psi and
threshold truncation do what StyleGAN's and the old --truncation did, seed specs parse or fail in
one line, and the web page's twin (export/web/latents.js, run under node) gives bit-identical z."""

import json
import shutil
import subprocess
from typing import get_args

import numpy as np
import pytest

from distgan.config.model import ZDistribution
from distgan.errors import UserError
from export.latents import (
    MAX_SEED,
    Z_DISTRIBUTIONS,
    latents,
    parse_seeds,
    seed_values,
    triple32,
)
from tests.helpers import REPO

LATENTS_JS = REPO / "export" / "web" / "latents.js"


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_a_seeds_z_depends_on_that_seed_alone(distribution):
    together = latents([3, 7, 11], 32, distribution)
    assert together.dtype == np.float32 and together.shape == (3, 32)
    assert np.array_equal(latents([7], 32, distribution)[0], together[1])
    assert np.array_equal(latents([11, 3], 32, distribution), together[[2, 0]])
    assert np.array_equal(latents([7], 20, distribution)[0], together[1, :20])  # a prefix
    rows = latents(list(range(200)), 32, distribution)
    assert len({row.tobytes() for row in rows}) == 200
    assert not np.array_equal(latents([7], 32, "normal"), latents([7], 32, "uniform"))


def test_normal_and_uniform_have_their_distributions():
    normal = latents(list(range(1000)), 128)
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    assert abs(np.mean(normal**4) - 3) < 0.1  # Gaussian tails, not only its first moments
    correlation = np.corrcoef(normal[:, :-1].ravel(), normal[:, 1:].ravel())[0, 1]
    assert abs(correlation) < 0.01  # neighbouring components, cosine and sine of one pair
    seeds = np.corrcoef(normal[:-1].ravel(), normal[1:].ravel())[0, 1]
    assert abs(seeds) < 0.01  # neighbouring seeds
    uniform = latents(list(range(1000)), 128, "uniform")
    assert uniform.min() >= -1 and uniform.max() < 1
    assert abs(uniform.mean()) < 0.01 and abs(uniform.std() - 1 / np.sqrt(3)) < 0.01
    counts = np.histogram(uniform, bins=10, range=(-1, 1))[0]
    assert np.abs(counts / counts.mean() - 1).max() < 0.03


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_psi_and_threshold_truncation(distribution):
    seeds = list(range(50))
    plain = latents(seeds, 64, distribution)
    assert np.allclose(latents(seeds, 64, distribution, psi=0.7), plain * 0.7, atol=0)
    assert not latents(seeds, 64, distribution, psi=0.0).any()  # psi 0: the mean z, for both
    kept = latents(seeds, 64, distribution, threshold=0.5)
    assert np.abs(kept).max() <= 0.5 and kept.std() > 0.2
    stream = seed_values([9], 0, 1000, distribution)[0]
    assert np.array_equal(kept[9], stream[np.abs(stream) <= 0.5][:64])  # in the stream's order
    assert np.array_equal(latents([9], 64, distribution, threshold=0.5)[0], kept[9])
    both = latents(seeds, 64, distribution, psi=0.5, threshold=0.5)
    assert np.array_equal(both, kept * np.float32(0.5))
    for bad in [dict(psi=1.5), dict(psi=-0.1), dict(psi=float("nan")), dict(threshold=0.0)]:
        with pytest.raises(UserError, match="is not allowed: use"):
            latents(seeds, 64, distribution, **bad)


def test_seed_specs_parse_or_fail_in_one_line():
    assert parse_seeds("0-3,100") == [0, 1, 2, 3, 100]
    assert parse_seeds(" 7 , 2-3") == [7, 2, 3]
    assert parse_seeds(str(MAX_SEED)) == [MAX_SEED]
    assert latents([0, MAX_SEED], 4).shape == (2, 4)
    bad = {
        "": "is not a seed or a range",
        "3,x": "'x' is not a seed or a range",
        "-1": "is not a seed or a range",
        "1.5": "is not a seed or a range",
        "9-2": "runs backwards: write 2-9",
        f"0,{MAX_SEED + 1}": "is out of range",
        "1-3,2": "names seed 2 twice",
        "0-20000000": "split the job",
    }
    for spec, message in bad.items():
        with pytest.raises(UserError, match=message) as raised:
            parse_seeds(spec)
        assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="out of range"):
        latents([MAX_SEED + 1], 4)


def run_node(script: str):
    result = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (Debian's nodejs)")
def test_the_web_pages_twin_gives_the_same_z_bit_for_bit():
    seeds = [*range(300), 65535, 2**31, MAX_SEED]
    cases = {
        "normal": ("normal", 1, None),
        "uniform": ("uniform", 1, None),
        "truncated": ("normal", 0.7, 0.5),
        "truncated_uniform": ("uniform", 0.3, 0.25),
    }
    script = f"""
const L = require({json.dumps(str(LATENTS_JS))});
const seeds = {json.dumps(seeds)};
const cases = {json.dumps(cases)};
const out = {{words: Array.from([0, 1, 2, 12345, {MAX_SEED}], L.triple32)}};
for (const [name, [distribution, psi, threshold]] of Object.entries(cases)) {{
  out[name] = Array.from(L.latents(seeds, 65, distribution, psi, threshold));
}}
out.specs = ["0-3,100", " 7 , 2-3"].map((s) => L.parseSeeds(s));
out.errors = ["3,x", "9-2", "1-3,2", "0,{MAX_SEED + 1}"].map((s) => {{
  try {{ L.parseSeeds(s); return null; }} catch (err) {{ return err.message; }}
}});
console.log(JSON.stringify(out));
"""
    web = run_node(script)
    assert web["words"] == triple32([0, 1, 2, 12345, MAX_SEED]).tolist()
    for name, (distribution, psi, threshold) in cases.items():
        ours = latents(seeds, 65, distribution, psi=psi, threshold=threshold)
        theirs = np.array(web[name], dtype=np.float32).reshape(len(seeds), 65)
        # The same bits, up to the last float32 bit where numpy's and V8's log/cos/sin round
        # a float64 differently (each within an ulp or so of the true value).
        assert np.abs(ours - theirs).max() <= 1e-6, name
        assert (ours != theirs).mean() < 1e-3, name
    assert web["specs"] == [parse_seeds("0-3,100"), parse_seeds(" 7 , 2-3")]
    assert all(web["errors"]), web["errors"]  # the same specs are refused


def test_export_knows_every_z_distribution_the_models_train_with():
    # export cannot import torch (models.py): its own list must follow the models' Literal.
    assert get_args(ZDistribution) == Z_DISTRIBUTIONS
