"""Experiment tracking (--report-to), with the real libraries: TensorBoard's event files hold every
metrics.jsonl number at its step, FID/KID included, the sample grids as saved and the config as
hyperparameters, in OUT/tensorboard/; a resume or a rollback replaces the steps it redoes there;
W&B offline keeps its run (metrics, grids, config) under the run folder; a tracker that is not
installed, or W&B without a login, is a one-line error before any work; auto picks TensorBoard
only when it is installed; under 2 processes only the main one writes; a run stopped for
non-finite losses (exit 3) leaves its lines in TensorBoard."""

import io
import json
import shutil
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from distgan.config.config import make_config
from distgan.errors import UserError
from distgan.outputs import tracking
from tests.helpers import REPO, free_port, image_array, run_train, small_run

EVAL = ["--eval-every", "10", "--eval-features", "pixels", "--eval-num", "32"]


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(record: dict) -> dict:
    """The trackers' names and values for a metrics.jsonl line: eval/KEY for the evaluation
    lines (those with FID), train/KEY for the others."""
    section = "eval" if "fid" in record else "train"
    return {f"{section}/{k}": v for k, v in record.items() if k != "step" and tracking.is_number(v)}


def tensorboard_events(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(out_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return events


def assert_tensorboard_holds(events, records: list[dict]) -> None:
    """Every number of every metrics.jsonl line, at its step (TensorBoard keeps float32; a NaN
    loss is NaN in both)."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in numbers(record).items():
            expected.setdefault(key, {})[record["step"]] = value
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        logged = events.Scalars(key)
        assert [e.step for e in logged] == list(by_step), key
        values = np.array([e.value for e in logged], dtype=np.float32)
        np.testing.assert_array_equal(values, np.array(list(by_step.values()), np.float32), key)


@pytest.mark.slow
def test_tensorboard_gets_metrics_fid_samples_and_config(tmp_path, faces_cache):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    flags = small_run(out, faces_cache, "--max-steps", "20", "--report-to", "tensorboard", *EVAL)
    result = run_train(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    # One run folder for TensorBoard, in the run folder: `tensorboard --logdir runs/` finds it.
    files = [p for p in (out / "tensorboard").rglob("*") if p.is_file()]
    assert [p.parent for p in files] == [out / "tensorboard"]
    assert files[0].name.startswith("events.out.tfevents.")

    events = tensorboard_events(out)
    records = metrics(out)
    assert [r["step"] for r in records if "fid" in r] == [10, 20]
    assert_tensorboard_holds(events, records)
    grids = {e.step: e for e in events.Images("samples")}
    assert sorted(grids) == [10, 20]
    for step, event in grids.items():
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        saved = image_array(out / "samples" / f"step-{step:08d}.png")
        assert np.array_equal(logged, saved)  # the grid as saved, pixel for pixel

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert set(events.Tags()["scalars"]) >= {"train/loss_d", "eval/fid", "eval/kid_mean"}
    assert hparams["lr_g"].number_value == pytest.approx(2e-4)
    assert hparams["resolution"].number_value == 32
    assert hparams["report_to"].string_value == "tensorboard"
    assert hparams["precision"].string_value in ("bf16", "no")  # what auto resolved to
    assert hparams["num_processes"].number_value == 1
    assert "max_steps" in hparams and "crop_box" not in hparams  # unset fields left out


BLOCK = 32768  # W&B's .wandb file: a 7-byte header, then LevelDB's log format in 32 KiB blocks


def wandb_records(path):
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, parts = 7, []
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # too little room for a header: padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            yield Record.FromString(b"".join(parts))
            parts = []


def wandb_items(items) -> dict:
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}


@pytest.mark.slow
def test_wandb_offline_keeps_its_run_in_the_run_folder(tmp_path, faces_cache):
    out = tmp_path / "run"
    flags = small_run(out, faces_cache, "--max-steps", "10", "--report-to", "wandb", *EVAL)
    result = run_train(*flags, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "tensorboard").exists()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    records = list(wandb_records(log))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("exit") == 1  # finished cleanly

    (started,) = [r.run for r in records if r.HasField("run")]
    assert (started.project, started.display_name) == ("distgan", "run")
    config = {}
    for record in records:
        if record.HasField("config"):
            config.update(wandb_items(record.config.update))
    assert config["lr_g"] == pytest.approx(2e-4) and config["report_to"] == "wandb"

    history = {}
    for record in records:
        if record.HasField("history"):
            items = wandb_items(record.history.item)
            history[items["_step"]] = items
    lines = metrics(out)
    assert sorted(history) == sorted({r["step"] for r in lines}) == [5, 10]
    for line in lines:
        for key, value in numbers(line).items():
            assert history[line["step"]][key] == value, key
    (image,) = history[10]["samples/filenames"]
    logged = image_array(run_dir / "files" / image)
    assert np.array_equal(logged, image_array(out / "samples" / "step-00000010.png"))


# Without tensorboard (and tensorboardX): a None in sys.modules makes importing it, and
# Accelerate's check that it is installed, fail as if it were not there.
WITHOUT_TENSORBOARD = (
    "import sys; sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None; "
    "from distgan.training.cli import main; main(sys.argv[1:])"
)


@pytest.mark.slow
def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path):
    import subprocess

    out = tmp_path / "run"
    for report_to in ("tensorboard", "all"):
        command = [sys.executable, "-c", WITHOUT_TENSORBOARD, "--out-dir", str(out)]
        command += ["--report-to", report_to, "--max-steps", "1"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (
            f"error: report_to={report_to} needs tensorboard, which is not installed: pip "
            "install tensorboard (or pip install -e '.[track]'), or pass --report-to none"
        )
        assert not out.exists()  # stopped before any work


@pytest.mark.slow
def test_wandb_that_cannot_start_is_a_one_line_error(tmp_path, faces_cache):
    out = tmp_path / "run"
    home = tmp_path / "home"  # no `wandb login` there
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "online"}
    result = run_train(*small_run(out, faces_cache, "--report-to", "wandb"), env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: W&B could not start (No API key configured. Use `wandb login` to log in.): run "
        "`wandb login`, or set WANDB_MODE=offline to keep the run in the run folder's wandb/ for "
        "`wandb sync`"
    )
    assert not (out / "samples").exists()  # before the data and the models


def test_auto_picks_tensorboard_only_when_installed(monkeypatch):
    assert tracking.tracker_names("auto") == ["tensorboard"]  # the test extra installs it
    assert tracking.tracker_names("all") == ["tensorboard", "wandb"]
    assert tracking.tracker_names("none") == []
    monkeypatch.setattr(tracking, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    assert tracking.tracker_names("auto") == []
    with pytest.raises(UserError, match="pip install wandb"):
        tracking.tracker_names("wandb")
    with pytest.raises(
        UserError, match="needs tensorboard and wandb.*pip install tensorboard wandb"
    ):
        tracking.tracker_names("all")
    with pytest.raises(UserError, match="report_to='tb' is not allowed: use one of auto, none"):
        make_config(report_to="tb")


@pytest.mark.slow
def test_only_the_main_process_writes(tmp_path, faces_cache):
    out = tmp_path / "ddp"
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    flags = small_run(out, faces_cache, "--max-steps", "10", "--report-to", "tensorboard")
    result = run_train(*flags, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    (events_file,) = (out / "tensorboard").iterdir()
    assert events_file.name.startswith("events.out.tfevents.")
    records = metrics(out)
    assert [r["images_seen"] for r in records] == [80, 160]  # both processes trained
    assert_tensorboard_holds(tensorboard_events(out), records)


def last_line_per_step(records: list[dict]) -> list[dict]:
    """metrics.jsonl after steps were redone (a resume, a rollback): the newest line of each step
    and kind, in step order."""
    newest = {(r["step"], tuple(sorted(r))): r for r in records}
    return sorted(newest.values(), key=lambda r: r["step"])


@pytest.mark.slow
def test_a_resumed_run_replaces_the_steps_it_redoes(tmp_path, faces_cache):
    out = tmp_path / "run"
    flags = small_run(out, faces_cache, "--report-to", "tensorboard")
    assert run_train(*flags, "--max-steps", "20").returncode == 0
    shutil.rmtree(out / "checkpoints" / "step-00000020")  # as if killed before it was written
    result = run_train(*flags, "--max-steps", "20", "--lr-g", "1e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 10 -> 20" in result.stdout
    assert len(list((out / "tensorboard").iterdir())) == 2  # one events file per start
    events = tensorboard_events(out)
    logged = [(e.step, e.value) for e in events.Scalars("train/lr_g")]
    assert logged == [(5, np.float32(2e-4)), (10, np.float32(2e-4))] + [
        (15, np.float32(1e-4)),
        (20, np.float32(1e-4)),
    ]
    assert_tensorboard_holds(events, last_line_per_step(metrics(out)))
    assert [e.step for e in events.Images("samples")] == [10, 20]


@pytest.mark.slow
def test_a_rollback_replaces_the_steps_it_redoes(tmp_path, faces_cache):
    out = tmp_path / "run"
    streak = ["--max-steps", "40", "--nonfinite-limit", "8", "--report-to", "tensorboard"]
    result = run_train(*small_run(out, faces_cache, *streak), env={"DISTGAN_INJECT_NAN": "22:12"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    (rollback,) = [r for r in records if r.get("event") == "rollback"]
    assert rollback["step"] == 20
    events = tensorboard_events(out)
    first_pass = [r["skipped_steps"] for r in records if r["step"] in (25, 30) and "loss_d" in r]
    assert first_pass[:2] == [4, 5] and first_pass[2:] == [0, 0]
    skipped = {e.step: e.value for e in events.Scalars("train/skipped_steps")}
    assert (skipped[25], skipped[30]) == (0, 0)  # the replay, not the pass that rolled back
    assert [(e.step, e.value) for e in events.Scalars("train/lr_scale")] == [(20, 0.5)]
    assert_tensorboard_holds(events, last_line_per_step(records))


@pytest.mark.slow
def test_a_run_stopped_for_nonfinite_losses_keeps_its_tensorboard_lines(tmp_path, faces_cache):
    out = tmp_path / "stop"
    streak = ["--max-steps", "40", "--nonfinite-limit", "4", "--on-nonfinite", "stop"]
    flags = small_run(out, faces_cache, *streak, "--report-to", "tensorboard")
    result = run_train(*flags, env={"DISTGAN_INJECT_NAN": "12:20"})
    assert result.returncode == 3, result.stderr[-3000:]
    records = metrics(out)
    assert records[-1]["step"] == 15 and records[-1]["skipped_steps"] == 4
    events = tensorboard_events(out)
    assert_tensorboard_holds(events, records)
    assert [e.step for e in events.Images("samples")] == [10]
