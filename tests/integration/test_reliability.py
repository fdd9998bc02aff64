"""Reliability: bad data is found by a scan before training (and `python -m distgan.data.loader scan`
lists it), then stops the run with the list or is skipped; SIGKILL at random moments, during
checkpoint writes too, loses nothing (the resumed weights equal an uninterrupted run's, bitwise);
an unwritable out dir and a full disk give clear errors and keep the previous checkpoint;
non-finite steps are skipped, rolled back or stop the run; planted pickles and tampered files are
refused without running code."""

import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distgan.data.folder import find_images, scan_images
from distgan.data.loader import ImageLoader
from distgan.outputs.checkpoint import list_checkpoints
from tests.helpers import REPO, run_module, run_train, small_run, write_images

small_run = functools.partial(small_run, sample_every=1000)


def bad_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """Good images in odd formats, plus every kind of bad file, and what the scan should say."""
    folder = root / "data"
    write_images(folder, 12, size=(48, 48))
    rng = np.random.default_rng(0)
    pixels = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(pixels[:, :, 0]).save(folder / "gray.jpg")
    Image.fromarray((rng.random((48, 48)) * 65535).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(np.dstack([pixels, pixels[:, :, :1]])).save(folder / "rgba.png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    good = (folder / "part0" / "0000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_bytes(b"this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(pixels[:8, :8]).save(folder / "tiny.jpg")
    expected = {
        "truncated.jpg": "corrupt",
        "text.jpg": "not an image",
        "empty.png": "empty file",
        "tiny.jpg": "smaller than the crop box",
    }
    return folder, expected


def test_scan_lists_exactly_the_bad_files(tmp_path):
    folder, expected = bad_folder(tmp_path)
    result = run_module("distgan.data.loader", "scan", folder, "--crop-box", "0", "0", "32", "32")
    assert result.returncode == 1
    listed = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert {Path(p).name for p in listed} == set(expected)
    for path, reason in listed.items():
        assert expected[Path(path).name] in reason
    assert "20 images, 4 bad" in result.stderr
    clean = run_module("distgan.data.loader", "scan", folder / "part0")
    assert clean.returncode == 0 and "10 images, 0 bad" in clean.stderr


def test_odd_but_valid_formats_decode_in_dali(tmp_path):
    folder, _ = bad_folder(tmp_path)
    files = [str(folder / n) for n in ("cmyk.jpg", "gray.jpg", "gray16.png", "rgba.png")]
    assert scan_images(files) == {}
    loader = ImageLoader(
        files, resolution=32, batch_size=4, shard_id=0, num_shards=1, seed=0, flip=False
    )
    batch = next(loader.epoch(0))
    assert batch.shape == (4, 3, 32, 32) and torch.isfinite(batch).all()


def test_scan_results_are_cached_and_rechecked_when_files_change(tmp_path):
    folder, _ = bad_folder(tmp_path)
    files = find_images(folder)
    cache = tmp_path / "scan.json"
    first = scan_images(files, [0, 0, 32, 32], cache_path=cache)
    assert len(first) == 4 and cache.is_file()
    assert scan_images(files, [0, 0, 32, 32], cache_path=cache) == first
    shutil.copy(folder / "part0" / "0001.jpg", folder / "truncated.jpg")  # repaired
    os.utime(folder / "truncated.jpg", ns=(1, 1))
    assert str(folder / "truncated.jpg") not in scan_images(files, [0, 0, 32, 32], cache_path=cache)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv: the scan runs without root's permission override",
)
def test_unreadable_files_are_listed(tmp_path):
    folder = tmp_path / "perm"
    write_images(folder, 3)
    locked = folder / "part0" / "0001.jpg"
    os.chmod(locked, 0)
    # Root reads every file; without CAP_DAC_OVERRIDE/READ_SEARCH it meets permissions like a user.
    drop = "-dac_override,-dac_read_search"
    setpriv = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]
    command = [*setpriv, sys.executable, "-m", "distgan.data.loader", "scan", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == f"{locked}: unreadable: permission denied"


@pytest.mark.slow
def test_trainer_stops_on_bad_images_or_skips_them(tmp_path):
    folder, expected = bad_folder(tmp_path)
    model = ["--resolution", "32", "--g-channels", "8", "--d-channels", "8", "--batch-size", "4"]
    short = ["--crop-box", "0", "0", "32", "32", "--max-steps", "4"]
    common = ["--data-dir", folder, *model, *short, "--cache-dir", tmp_path / "cache"]
    stopped = run_train(*common, "--out-dir", tmp_path / "stop")
    assert stopped.returncode == 2
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 4 of 20 images in") and "--on-bad-image skip" in line
    listing = (tmp_path / "stop" / "bad_images.txt").read_text().splitlines()
    assert sorted(Path(row.split(": ")[0]).name for row in listing) == sorted(expected)
    assert not (tmp_path / "stop" / "checkpoints").exists()

    skipped = run_train(*common, "--out-dir", tmp_path / "skip", "--on-bad-image", "skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipping 4 of 20 images" in skipped.stdout and "16 images in" in skipped.stdout
    assert (tmp_path / "skip" / "generator.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path, faces_cache):
    """Killed with SIGKILL at least 5 times (at least once while a checkpoint is being written),
    resumed each time: the final weights equal an uninterrupted run's, bitwise (CPU fp32 with
    the same threads is deterministic, and every resume restores weights, optimizer, RNG and
    data position exactly)."""
    args = [
        "--max-steps",
        "800",
        "--ckpt-every",
        "4",
        "--keep-checkpoints",
        "2",
        "--mixed-precision",
        "no",
        "--report-to",
        "none",  # the kills are timed from the start: no tracker start-up in front of training
    ]
    reference = tmp_path / "reference"
    assert run_train(*small_run(reference, faces_cache, *args)).returncode == 0
    out = tmp_path / "killed"
    command = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        *map(str, small_run(out, faces_cache, *args)),
    ]
    rng = random.Random(1)
    kills, during_write, resumed_from = 0, 0, []
    while kills < 6:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
        )
        printed = []
        if kills == 0:  # the first kill waits for a checkpoint being written
            staging = out / "checkpoints"
            while process.poll() is None and not list(staging.glob(".staging-*")):
                time.sleep(0.002)
        else:  # a random moment of training, timed from its start whatever start-up takes
            printed = lines_until_training(process)
            time.sleep(rng.uniform(0.5, 1.5))
        if process.poll() is not None:
            break  # finished before this kill
        during_write += bool(list((out / "checkpoints").glob(".staging-*")))
        process.kill()
        stdout = "".join(printed) + process.communicate()[0]
        kills += 1
        resumed_from += [line for line in stdout.splitlines() if line.startswith("distgan:")]
    assert kills >= 5 and during_write >= 1
    final = run_train(*small_run(out, faces_cache, *args))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "-> 800" in final.stdout and "steps 0 -> 800" not in final.stdout
    assert any("steps 0 ->" not in line for line in resumed_from[1:])  # relaunches resumed
    assert not list((out / "checkpoints").glob(".staging-*"))
    for name in ("generator.safetensors", "checkpoints/step-00000800/model_1.safetensors"):
        a, b = load_file(reference / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def lines_until_training(process: subprocess.Popen) -> list[str]:
    """The trainer's stdout up to its start line (printed once it is set up and has resumed)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("distgan:"):
            break
    return lines


def test_unwritable_out_dir_fails_before_work(tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    result = run_train("--out-dir", tmp_path / "file" / "run", "--max-steps", "1")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith(f"error: cannot write to out_dir {tmp_path / 'file' / 'run'}")
        and "--out-dir" in line
    )


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    mounts = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        if os.geteuid() != 0 or not mount_tmpfs(path, options):
            pytest.skip(
                "cannot mount a tmpfs here (needs root in a mount-capable sandbox) to simulate the disk"
            )
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_read_only_out_dir_fails_before_work(small_disk):
    disk = small_disk("readonly", "size=1m,ro")
    result = run_train("--out-dir", disk / "run", "--max-steps", "1")
    assert (
        result.returncode == 2
        and "cannot write to out_dir" in result.stderr.strip().splitlines()[-1]
    )


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, faces_cache, small_disk):
    probe = tmp_path / "probe"
    assert run_train(*small_run(probe, faces_cache, "--max-steps", "10")).returncode == 0
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "step-00000010").iterdir())
    disk = small_disk(
        "disk", f"size={int(size * 1.6) + 400_000}"
    )  # room for one checkpoint, not two
    out = disk / "run"
    result = run_train(*small_run(out, faces_cache, "--max-steps", "40", "--keep-checkpoints", "3"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write checkpoint step-00000020")
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-00000010'} is intact" in line
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000010"]
    assert not list((out / "checkpoints").glob(".staging-*"))
    moved = tmp_path / "moved"  # "free space": the same run, resumed on a bigger disk
    shutil.copytree(out, moved)
    resumed = run_train(*small_run(moved, faces_cache, "--max-steps", "20"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 10 -> 20" in resumed.stdout


@pytest.mark.slow
def test_a_few_nonfinite_steps_are_skipped_and_logged(tmp_path, faces_cache):
    out = tmp_path / "skip"
    result = run_train(
        *small_run(out, faces_cache, "--max-steps", "30"), env={"DISTGAN_INJECT_NAN": "12:3"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 3, 0, 0, 0]
    assert "skipped 3 step(s) with non-finite losses or gradients" in result.stderr + result.stdout
    weights = load_file(out / "generator.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_a_long_nonfinite_streak_rolls_back_with_lower_learning_rates(tmp_path, faces_cache):
    out = tmp_path / "rollback"
    flags = small_run(out, faces_cache, "--max-steps", "60", "--nonfinite-limit", "8")
    result = run_train(*flags, env={"DISTGAN_INJECT_NAN": "22:12"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    position = next(i for i, r in enumerate(records) if r.get("event") == "rollback")
    rollback = records[position]
    assert rollback["lr_scale"] == 0.5 and rollback["checkpoint"] in (
        "step-00000020",
        "step-00000030",
    )
    after = [r for r in records[position + 1 :] if "lr_g" in r]
    assert after and all(r["lr_g"] == pytest.approx(1e-4) for r in after)
    assert sum(r.get("event") == "rollback" for r in records) == 1  # the replayed steps are clean
    state = json.loads((out / "checkpoints" / "step-00000060" / "trainer_state.json").read_text())
    assert state["lr_scale"] == 0.5  # a resume keeps the lowered rates


@pytest.mark.slow
def test_a_long_nonfinite_streak_can_stop_the_run(tmp_path, faces_cache):
    out = tmp_path / "stop"
    streak = ["--max-steps", "60", "--nonfinite-limit", "8", "--on-nonfinite", "stop"]
    result = run_train(*small_run(out, faces_cache, *streak), env={"DISTGAN_INJECT_NAN": "22:20"})
    assert result.returncode == 3
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training stopped: ") and "consecutive non-finite steps" in line
    assert "the last good checkpoint is" in line and "step-00000020" in line


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_planted_pickles_and_tampered_weights_are_refused(tmp_path, faces_cache):
    out = tmp_path / "run"
    assert run_train(*small_run(out, faces_cache, "--max-steps", "10")).returncode == 0
    checkpoint = out / "checkpoints" / "step-00000010"
    # As saved before checksums (which would refuse these files first): loading them must.
    (checkpoint / "checksums.json").unlink()
    marker = tmp_path / "code-ran"
    for victim in ("random_states_0.pkl", "optimizer.bin"):
        original = (checkpoint / victim).read_bytes()
        torch.save({"state": Payload(marker)}, checkpoint / victim)
        result = run_train(*small_run(out, faces_cache, "--max-steps", "20"))
        assert result.returncode == 2, victim
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: checkpoint {checkpoint} could not be loaded"), line
        assert not marker.exists()  # the payload never ran
        (checkpoint / victim).write_bytes(original)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    result = run_train(*small_run(out, faces_cache, "--max-steps", "20"))
    assert (
        result.returncode == 2 and "could not be loaded" in result.stderr.strip().splitlines()[-1]
    )

    from distgan.errors import UserError
    from distgan.outputs.checkpoint import load_generator

    torch.save({"w": Payload(marker)}, out / "generator.safetensors")  # a pickle named as weights
    with pytest.raises(UserError, match="does not hold the weights"):
        load_generator(out)
    assert not marker.exists()


def test_wrong_latent_size_for_an_onnx_model_is_a_clear_error(tmp_path):
    from distgan.models.dcgan import Generator, ModelConfig
    from distgan.outputs.checkpoint import save_generator
    from export.onnx_export import export_onnx

    save_generator(
        tmp_path,
        Generator(ModelConfig(resolution=32, g_channels=8, z_dim=16)).eval(),
        step=1,
        images_seen=1,
    )
    export_onnx(tmp_path / "generator.safetensors", tmp_path / "g.onnx", log=lambda _: None)
    flags = ["--model", tmp_path / "g.onnx", "--num", "2", "--out-dir", tmp_path / "out"]
    result = run_module("export", "generate", *flags, "--z-dim", "32")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --z-dim 32 does not match the model's input [batch, 16]"
    ]
