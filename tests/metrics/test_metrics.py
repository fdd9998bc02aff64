"""Metrics: the Fréchet distance against float64 numpy/scipy references (random Gaussians, equal
covariances in closed form, near-singular covariances); KID against a direct computation; the
whole pipeline with the 8x8 pixel extractor (real statistics through DALI, their cache, generated
features, FID(real, real) = 0, FID growing with corruption, two processes = one process); the
Inception weights (checksum, pickled payloads refused, a one-line error when missing, and the
real network when its weights are present); grayscale models scored against grayscale real images
(one channel repeated for the extractor, statistics cached apart) and fake z drawn from the
model's own z distribution; a conditional model scored on labels drawn from the data's, the same
every evaluation; FID/KID during training and standalone evaluation."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from distgan.config.model import ModelConfig
from distgan.data.folder import find_images
from distgan.errors import UserError
from distgan.metrics import features as extractors
from distgan.metrics import fid as metrics
from distgan.metrics import stats as statistics
from tests.helpers import REPO, SMALL_GAN, run_module, run_train, write_images


def stats(mu, sigma):
    return metrics.Stats(
        np.asarray(mu, float), np.asarray(sigma, float), np.zeros((1, len(mu)), np.float32), 0
    )


def reference_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def random_covariance(rng, d, n):
    x = rng.standard_normal((n, d))
    return np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy_on_random_gaussians():
    rng = np.random.default_rng(0)
    for d in (4, 32, 128):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_covariance(rng, d, 4 * d), random_covariance(rng, d, 4 * d)
        assert metrics.fid(stats(mu1, s1), stats(mu2, s2)) == pytest.approx(
            reference_fid(mu1, s1, mu2, s2), rel=1e-7
        )


def test_equal_covariances_leave_the_mean_term():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    sigma = random_covariance(rng, 64, 500)
    assert metrics.fid(stats(mu1, sigma), stats(mu2, sigma)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2), rel=1e-7
    )
    assert abs(metrics.fid(stats(mu1, sigma), stats(mu1, sigma))) < 1e-7


def test_near_singular_covariances_match_the_closed_form():
    # Covariances sharing eigenvectors commute: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(2)
    d = 64
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = np.concatenate([rng.uniform(0.5, 2.0, 40), np.full(24, 1e-12)])  # rank 40 of 64
    b = np.concatenate([rng.uniform(0.5, 2.0, 30), np.full(34, 1e-14)])  # rank 30 of 64
    s1, s2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.fid(stats(mu1, s1), stats(mu2, s2)) == pytest.approx(
        expected, rel=1e-6, abs=1e-6
    )


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((250, 16)) * 1.3 + 0.2).astype(np.float32)
    a = metrics.Stats(real.mean(0), np.cov(real, rowvar=False), real, len(real))
    b = metrics.Stats(fake.mean(0), np.cov(fake, rowvar=False), fake, len(fake))
    mean, std = metrics.kid(a, b, subsets=20, seed=7)

    def kernel(x, y):  # the cubic polynomial kernel of KID
        return (x @ y.T / x.shape[1] + 1.0) ** 3

    choose = np.random.RandomState(7)
    mmds = []
    for _ in range(20):
        x = real[choose.choice(300, 250, replace=False)].astype(np.float64)
        y = fake[choose.choice(250, 250, replace=False)].astype(np.float64)
        m = len(x)
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds.append(within_x + within_y - 2 * kxy.mean())
    assert mean == pytest.approx(np.mean(mmds), rel=1e-5)
    assert std == pytest.approx(np.std(mmds), rel=1e-4)
    again = rng.standard_normal((300, 16)).astype(np.float32)  # the same distribution as `real`
    c = metrics.Stats(again.mean(0), np.cov(again, rowvar=False), again, len(again))
    same = metrics.kid(a, c, subsets=20)[0]
    assert abs(same) < mean / 10


class ImageBank(torch.nn.Module):
    """A stand-in generator that returns given images (in order), optionally corrupted."""

    def __init__(self, images, noise=0.0):
        super().__init__()
        self.images, self.noise, self.position = images, noise, 0
        self.config = ModelConfig(z_dim=4)

    def forward(self, z):
        batch = self.images[self.position : self.position + len(z)]
        self.position += len(z)
        noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(self.position))
        return (batch + self.noise * noise).clamp(-1, 1)


# real_stats' loading arguments for the test images: 32 px, on the CPU
LOADING = dict(resolution=32, crop_box=None, batch_size=4, num_threads=1, device_id=None)


def decoded(folder):
    from distgan.data.loader import ImageLoader

    files = find_images(folder)
    loader = ImageLoader(
        files, resolution=32, batch_size=4, shard_id=0, num_shards=1, seed=0, flip=False
    )
    return torch.cat([b.clone() for b in loader.epoch(0)]), files


def test_pipeline_fid_is_zero_for_the_real_set_and_grows_with_corruption(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 40)
    images, files = decoded(folder)
    extractor, dist = extractors.PixelFeatures(), statistics.SingleProcess()
    real = statistics.real_stats(dist, extractor, files, **LOADING)
    assert real.count == 40 and real.features.shape == (40, 192)
    fids, sampling = [], dict(batch_size=8, seed=0, device=torch.device("cpu"))
    for noise in (0.0, 0.1, 0.3, 0.8):
        fake = statistics.fake_stats(dist, extractor, ImageBank(images, noise), 40, **sampling)
        fids.append(metrics.fid(real, fake))
    assert abs(fids[0]) < 1e-5  # the same images: the same statistics (up to eigenvalue noise)
    assert fids == sorted(fids) and fids[-1] > 10 * fids[1] > 0


class LatentRecorder(torch.nn.Module):
    """A stand-in gray generator that keeps the z it is given and returns flat gray images."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config, self.seen = config, []

    def forward(self, z):
        self.seen.append(z)
        return z[:, :1, None, None].expand(-1, 1, 28, 28)


def test_gray_models_are_scored_on_gray_images_with_their_own_latents(tmp_path):
    write_images(tmp_path / "images", 12)
    files = find_images(tmp_path / "images")
    extractor, dist = extractors.PixelFeatures(), statistics.SingleProcess()
    gray = statistics.real_stats(dist, extractor, files, **{**LOADING, "channels": 1})
    rgb = statistics.real_stats(dist, extractor, files, **LOADING)
    assert gray.features.shape == rgb.features.shape == (12, 192)  # 3 x 8 x 8 either way
    r, g, b = np.split(gray.features, 3, axis=1)  # the one channel, repeated
    assert np.array_equal(r, g) and np.array_equal(g, b) and not np.array_equal(gray.mu, rgb.mu)
    config = ModelConfig(resolution=28, channels=1, z_dim=8, z_distribution="uniform")
    recorder = LatentRecorder(config)
    sampling = dict(batch_size=5, seed=0, device=torch.device("cpu"))
    scored = statistics.score(dist, extractor, recorder, gray, count=40, **sampling)
    z = torch.cat(recorder.seen)
    assert z.shape == (40, 8) and z.min() >= -1 and z.max() <= 1 and z.min() < -0.9
    assert scored["channels"] == 1 and scored["resolution"] == 28 and scored["n_fake"] == 40
    x = SimpleNamespace(name="x", numerics="cpu fp32")
    rgb_key = statistics.real_stats_key(files, 32, None, 12, x)
    assert statistics.real_stats_key(files, 32, None, 12, x, channels=3) == rgb_key  # as before
    assert statistics.real_stats_key(files, 32, None, 12, x, channels=1) != rgb_key


def test_real_statistics_cache_round_trip_and_key(tmp_path):
    write_images(tmp_path / "images", 12)
    files = find_images(tmp_path / "images")
    real = statistics.real_stats(
        statistics.SingleProcess(), extractors.PixelFeatures(), files, **LOADING
    )
    path = tmp_path / "cache" / "stats.npz"
    statistics.save_stats(path, real)
    loaded = statistics.load_stats(path)
    assert np.array_equal(loaded.mu, real.mu) and np.array_equal(loaded.sigma, real.sigma)
    assert loaded.count == 12 and np.array_equal(loaded.features, real.features)
    path.write_bytes(b"corrupt")
    assert statistics.load_stats(path) is None  # recomputed, never trusted
    x, y = (SimpleNamespace(name=name, numerics="cpu fp32") for name in "xy")
    x_on_gpu = SimpleNamespace(name="x", numerics="cuda fp32, TF32 off")
    key = statistics.real_stats_key(files, 32, None, 12, x)
    assert key == statistics.real_stats_key(files, 32, None, 12, x)
    others = [
        statistics.real_stats_key(files, 64, None, 12, x),
        statistics.real_stats_key(files, 32, [0, 0, 8, 8], 12, x),
        statistics.real_stats_key(files, 32, None, 11, x),
        statistics.real_stats_key(files, 32, None, 12, y),
        statistics.real_stats_key(files[1:], 32, None, 12, x),
        statistics.real_stats_key(files, 32, None, 12, x_on_gpu),  # another device or precision
    ]
    assert key not in others and len(set(others)) == len(others)
    assert (
        statistics.real_files(files, 5) == statistics.real_files(files, 5)
        and len(statistics.real_files(files, 5)) == 5
    )


def test_gpu_decoded_real_statistics_are_cached_apart_from_cpu_decoded_ones(tmp_path, monkeypatch):
    """Issue 20, item 6: DALI's GPU JPEG decoder upsamples chroma otherwise than libjpeg-turbo,
    so pixel features (the same on any device) of GPU-decoded images differ from CPU-decoded
    ones: each decoder computes and caches its own statistics, and finds its own."""
    write_images(tmp_path / "images", 12)
    files = find_images(tmp_path / "images")
    x = SimpleNamespace(name="x", numerics="float64")
    cpu_key = statistics.real_stats_key(files, 32, None, 12, x)
    # CPU-decoded statistics keep the keys they had before the decoder was part of them.
    assert statistics.real_stats_key(files, 32, None, 12, x, decoded_on="cpu") == cpu_key
    assert statistics.real_stats_key(files, 32, None, 12, x, decoded_on="gpu") != cpu_key
    decoded_on, cpu_decode = [], statistics.real_stats

    def decode(dist, extractor, files, **pipeline):  # this machine decodes on its CPU only
        decoded_on.append(pipeline["device_id"])
        return cpu_decode(dist, extractor, files, **{**pipeline, "device_id": None})

    monkeypatch.setattr(statistics, "real_stats", decode)
    cache = tmp_path / "cache"
    for device_id in (None, 0, None, 0):
        pipeline = {**LOADING, "device_id": device_id}
        statistics.reference_stats(
            statistics.SingleProcess(),
            extractors.PixelFeatures(),
            files,
            cache_dir=cache,
            **pipeline,
        )
    assert decoded_on == [None, 0]  # once per decoder, then each from its own cache file
    assert len(list((cache / "fid-stats").glob("*.npz"))) == 2


@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(tmp_path):
    write_images(tmp_path / "images", 30)  # not a multiple of the global batch: padding is dropped
    script = str(REPO / "tests" / "scripts" / "metrics_check.py")
    results = []
    for processes in ("1", "2"):
        fixed = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher = ["accelerate", "launch", "--num_processes", processes, *fixed]
        if processes == "2":
            launcher.insert(2, "--multi_gpu")
        command = [*launcher, script, str(tmp_path / "images")]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, two = results
    assert one["n_real"] == two["n_real"] == 30 and one["n_fake"] == two["n_fake"] == 50
    for key in ("fid", "kid_mean", "real_mu_sum"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_inception_weights_are_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = (
        r"weights-inception-2015-12-05-6726825d.pth are not in .*hub/checkpoints and could not be "
        r"downloaded \(no network here\): put https://\S+ there, or pass --inception-weights PATH"
    )
    with pytest.raises(UserError, match=expected):
        extractors.inception_weights()
    with pytest.raises(UserError, match="does not exist"):
        extractors.inception_weights(tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"w": torch.zeros(2)}, wrong)
    with pytest.raises(UserError, match="is not the FID Inception weights"):
        extractors.inception_weights(wrong)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_payload_with_the_right_checksum_is_refused(tmp_path, monkeypatch, capsys):
    planted = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2), "evil": Payload()}, planted)
    import hashlib

    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    monkeypatch.setattr(extractors, "INCEPTION_SHA256_PREFIX", digest[:8])  # as if it collided
    with pytest.raises(UserError, match="holds more than weights and is refused"):
        extractors.inception_weights(planted)
    assert "pickled code ran" not in capsys.readouterr().out


def _inception_weights_present() -> str | None:
    import os

    path = (
        os.environ.get("DISTGAN_INCEPTION_WEIGHTS")
        or extractors.default_weights_dir() / extractors.INCEPTION_FILE
    )
    return str(path) if Path(path).is_file() else None


@pytest.mark.skipif(
    _inception_weights_present() is None,
    reason=f"the FID Inception weights ({extractors.INCEPTION_FILE}) are not in {extractors.default_weights_dir()} and "
    "this machine cannot download them (no internet); set DISTGAN_INCEPTION_WEIGHTS to a copy to run this test",
)
def test_real_inception_features(tmp_path):
    write_images(tmp_path / "images", 20, size=(64, 64))
    extractor = extractors.InceptionFeatures(_inception_weights_present(), torch.device("cpu"))
    images, _ = decoded(tmp_path / "images")
    features = extractor(extractors.to_uint8(images))
    assert features.shape == (20, 2048) and torch.isfinite(features).all()


@pytest.mark.slow
def test_training_logs_fid_and_keeps_the_best_generator(tmp_path, faces_cache):
    out = tmp_path / "run"
    data = ["--out-dir", out, "--cache-dir", faces_cache, "--builtin-faces", "240"]
    evals = ["--eval-every", "10", "--eval-num", "64", "--eval-features", "pixels"]
    result = run_train(*data, *SMALL_GAN, "--log-every", "5", "--max-steps", "20", *evals)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for record in evals:
        assert record["n_real"] == 240 and record["n_fake"] == 64 and record["resolution"] == 32
        assert record["feature_extractor"].startswith("pixels-8x8") and record["resize"]
        assert record["fid"] > 0 and "kid_mean" in record and "kid_std" in record
    best = min(evals, key=lambda r: r["fid"])
    assert evals[-1]["best_fid"] == best["fid"] and evals[-1]["best_step"] == best["step"]
    assert json.loads((out / "best" / "generator.json").read_text())["step"] == best["step"]
    assert "FID" in result.stderr + result.stdout
    assert list((Path(faces_cache) / "fid-stats").glob("*.npz"))  # the real statistics were cached


@pytest.mark.slow
def test_standalone_evaluation_of_a_run_and_its_onnx_export(tmp_path, faces_cache):
    out = tmp_path / "run"
    data = ["--out-dir", out, "--cache-dir", faces_cache, "--builtin-faces", "240"]
    assert run_train(*data, *SMALL_GAN, "--max-steps", "10").returncode == 0
    common = ["--features", "pixels", "--num", "100", "--cache-dir", str(faces_cache)]
    run_eval = run_module("distgan.metrics.evaluate", "--run", out, *common, timeout=300)
    assert run_eval.returncode == 0, run_eval.stderr
    scored = json.loads(run_eval.stdout)
    assert scored["n_real"] == 240 and scored["n_fake"] == 100 and scored["fid"] > 0
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1]) == scored

    model = tmp_path / "g.onnx"
    exported = run_module("export", "onnx", "--run", out, "--out", model, "--uint8", timeout=300)
    assert exported.returncode == 0, exported.stderr
    onnx_eval = run_module("distgan.metrics.evaluate", "--onnx", model, *common, timeout=300)
    assert onnx_eval.returncode == 0, onnx_eval.stderr
    both = json.loads(onnx_eval.stdout)
    assert both["torch_fid"] == pytest.approx(scored["fid"], rel=1e-9)  # same z, same generator
    assert both["fid"] == pytest.approx(both["torch_fid"], rel=0.01)
    assert both["onnx_vs_torch_relative_fid_difference"] < 0.01


def test_inception_runs_in_ieee_fp32_and_restores_the_settings():
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [knob.fp32_precision for knob in knobs]
    with extractors.full_fp32():
        assert [knob.fp32_precision for knob in knobs] == ["ieee", "ieee"]
    assert [knob.fp32_precision for knob in knobs] == before


class LabelRecorder(LatentRecorder):
    """LatentRecorder for a conditional model: keeps the labels it is asked for too."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.labels = []

    def forward(self, z, labels):
        self.labels.append(labels)
        return super().forward(z)


def test_a_conditional_model_is_scored_on_labels_drawn_from_the_data():
    config = ModelConfig(
        resolution=28, channels=1, z_dim=8, conditioning="class", classes=["a", "b", "c"]
    )
    table = torch.tensor([0] * 30 + [2] * 10)  # the data: class a three times as often as c
    sampling = dict(batch_size=64, seed=0, device=torch.device("cpu"), label_table=table)
    extractor, dist = extractors.PixelFeatures(), statistics.SingleProcess()
    recorder = LabelRecorder(config)
    statistics.fake_stats(dist, extractor, recorder, 2000, **sampling)
    labels = torch.cat(recorder.labels)
    assert len(labels) == 2000 and set(labels.tolist()) == {0, 2}
    assert 0.7 < (labels == 0).float().mean() < 0.8
    again = LabelRecorder(config)
    statistics.fake_stats(dist, extractor, again, 2000, **sampling)
    assert torch.equal(torch.cat(again.labels), labels)  # the same labels every evaluation
    assert torch.equal(torch.cat(again.seen), torch.cat(recorder.seen))
