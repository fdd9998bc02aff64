"""Which checkpoint a run resumes from (distgan/training/resume.py, distgan/outputs/checksums.py): checksums are
written with every checkpoint; --resume auto skips a damaged newest checkpoint (a truncated or
altered file, a trainer_state.json lacking a field) for the newest intact one, keeps the damaged
one aside and says which and why; --resume PATH to a damaged checkpoint fails with one line;
checkpoints saved before checksums resume unverified. End to end with the real trainer too."""

import json

import pytest

from distgan.config.model import ModelConfig
from distgan.errors import UserError
from distgan.outputs.checkpoint import (
    STATE_FILE,
    TrainerState,
    list_checkpoints,
    read_trainer_state,
)
from distgan.outputs.checksums import CHECKSUMS_FILE, Damaged, verify_checksums, write_checksums
from distgan.training.resume import find_resume_point
from tests.helpers import run_train, small_run


def fake_checkpoint(root, step: int):
    """A checkpoint folder as save_checkpoint leaves it, with made-up weights."""
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "random_states_0.pkl").write_bytes(b"rng" * 10)
    state = {"step": step, "model": ModelConfig().to_dict()}
    (folder / STATE_FILE).write_text(json.dumps(state))
    write_checksums(folder)
    return folder


def resume_auto(root):
    said = []
    return find_resume_point("auto", root, say=said.append), said


def test_checksums_find_truncated_altered_and_missing_files(tmp_path):
    folder = fake_checkpoint(tmp_path, 10)
    assert verify_checksums(folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:1000])
    with pytest.raises(Damaged, match=r"^model.safetensors is truncated \(1000 of 10240 bytes\)$"):
        verify_checksums(folder)
    weights.write_bytes(original[:-1] + b"!")
    with pytest.raises(Damaged, match="model.safetensors does not match its sha256 checksum"):
        verify_checksums(folder)
    weights.unlink()
    with pytest.raises(Damaged, match="^model.safetensors is missing$"):
        verify_checksums(folder)
    (folder / CHECKSUMS_FILE).unlink()
    assert verify_checksums(folder) is False  # saved before checksums: unverified


def test_auto_resume_falls_back_from_a_truncated_newest_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (newest / "model.safetensors").write_bytes(b"\0" * 1000)
    chosen, said = resume_auto(tmp_path)
    assert chosen == tmp_path / "step-00000010"
    assert said == [
        "note: checkpoint step-00000020 is damaged (model.safetensors is truncated (1000 of 10240 "
        "bytes)); kept as damaged-step-00000020, resuming from step-00000010, the newest intact "
        "checkpoint"
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]
    assert (tmp_path / "damaged-step-00000020" / "model.safetensors").stat().st_size == 1000
    assert resume_auto(tmp_path) == (chosen, [])  # said once


def test_a_state_lacking_a_field_is_named_and_skipped(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (newest / STATE_FILE).write_text(json.dumps({"step": 20}))  # no "model"
    with pytest.raises(UserError) as error:
        read_trainer_state(newest)
    assert str(error.value).startswith(
        f"checkpoint {newest} is damaged (trainer_state.json lacks the field 'model'): resume "
        "from another checkpoint"
    )
    chosen, said = resume_auto(tmp_path)
    assert chosen.name == "step-00000010"
    assert said[0].startswith(
        "note: checkpoint step-00000020 is damaged (trainer_state.json lacks the field 'model')"
    )


def test_explicit_resume_from_a_damaged_checkpoint_fails_in_one_line(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    weights = newest / "model.safetensors"
    weights.write_bytes(b"X" + weights.read_bytes()[1:])
    with pytest.raises(UserError) as error:
        find_resume_point(str(newest), tmp_path, say=pytest.fail)
    message = str(error.value)
    assert message.startswith(
        f"checkpoint {newest} is damaged (model.safetensors does not match its sha256 checksum"
    )
    assert "--resume PATH" in message and "\n" not in message
    assert newest.is_dir()  # not moved: the user named it


def test_checkpoints_without_checksums_resume_unverified(tmp_path):
    old = fake_checkpoint(tmp_path, 10)
    (old / CHECKSUMS_FILE).unlink()
    chosen, said = resume_auto(tmp_path)
    assert chosen == old and said == [
        "note: step-00000010 predates checksums: resuming from it unverified"
    ]


def test_no_intact_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    only = fake_checkpoint(tmp_path, 10)
    (only / "random_states_0.pkl").write_bytes(b"")
    with pytest.raises(UserError, match="no intact checkpoint in .* step-00000010, is damaged"):
        resume_auto(tmp_path)
    assert only.is_dir()  # else the next --resume auto would silently start afresh


def test_explicit_resume_reads_the_state_once(tmp_path, monkeypatch):
    folder = fake_checkpoint(tmp_path, 10)
    read = []
    parse = TrainerState.from_json
    monkeypatch.setattr(
        TrainerState, "from_json", lambda values: read.append(values) or parse(values)
    )
    assert find_resume_point(str(folder), tmp_path, say=pytest.fail) == folder
    assert len(read) == 1
    with pytest.raises(UserError, match="is not a complete distgan checkpoint"):
        find_resume_point(str(tmp_path), tmp_path, say=pytest.fail)


@pytest.mark.slow
def test_a_trainer_resumes_past_damaged_checkpoints(tmp_path, faces_cache):
    out = tmp_path / "run"
    first = run_train(*small_run(out, faces_cache, "--max-steps", "30", "--keep-checkpoints", "3"))
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "checkpoints"
    listed = json.loads((checkpoints / "step-00000030" / CHECKSUMS_FILE).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_FILE} <= set(listed)

    # A truncated newest checkpoint: named with --resume, it stops the run in one line ...
    weights = checkpoints / "step-00000030" / "model_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    named = run_train(*small_run(out, faces_cache, "--max-steps", "40"), "--resume", weights.parent)
    assert named.returncode == 2
    assert (
        named.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: checkpoint {weights.parent} is damaged (model_1.safetensors is truncated (1000 of "
        )
    )
    # ... and --resume auto goes on from the one before.
    auto = run_train(*small_run(out, faces_cache, "--max-steps", "40"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert (
        "note: checkpoint step-00000030 is damaged (model_1.safetensors is truncated" in auto.stdout
    )
    assert "resuming from step-00000020, the newest intact checkpoint" in auto.stdout
    assert "steps 20 -> 40" in auto.stdout

    # A trainer_state.json lacking its model: named, skipped.
    state = checkpoints / "step-00000040" / STATE_FILE
    state.write_text(
        json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "model"})
    )
    again = run_train(*small_run(out, faces_cache, "--max-steps", "50"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "note: checkpoint step-00000040 is damaged (trainer_state.json lacks the field 'model')"
        in again.stdout
    )
    assert "steps 30 -> 50" in again.stdout
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == [
        "damaged-step-00000030",
        "damaged-step-00000040",
        "step-00000030",
        "step-00000040",
        "step-00000050",
    ]
