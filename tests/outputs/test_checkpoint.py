"""Checkpoints and generator files: generator round trip (files from before the channels, z
distribution and init keys load with their defaults; new files state them), finding the newest
complete checkpoint (staging folders ignored), and clear errors for missing, corrupt or foreign
files."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from distgan.config.model import ModelConfig
from distgan.errors import UserError
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import (
    STATE_FILE,
    TrainerState,
    list_checkpoints,
    load_generator,
    read_trainer_state,
    save_checkpoint,
    save_generator,
)
from distgan.outputs.generator_file import GENERATOR_META, GENERATOR_WEIGHTS


def test_generator_round_trip(tmp_path):
    config = ModelConfig(resolution=32, g_channels=8, z_dim=16)
    generator = Generator(config).eval()
    save_generator(tmp_path, generator, step=7, images_seen=448)
    loaded, meta = load_generator(tmp_path)
    assert meta["step"] == 7 and meta["z_dim"] == 16 and meta["resolution"] == 32
    assert meta["model"] == config.to_dict()
    z = torch.randn(3, 16)
    torch.testing.assert_close(loaded(z), generator(z), rtol=0, atol=0)
    assert not loaded.training
    assert sorted(p.name for p in tmp_path.iterdir()) == [GENERATOR_META, GENERATOR_WEIGHTS]


def test_generator_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_generator(tmp_path)
    save_generator(
        tmp_path, Generator(ModelConfig(resolution=32, g_channels=8)), step=1, images_seen=1
    )
    (tmp_path / GENERATOR_WEIGHTS).write_bytes(b"\x00" * 64)  # truncated / corrupt
    with pytest.raises(UserError, match="does not hold the weights"):
        load_generator(tmp_path)
    (tmp_path / GENERATOR_META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a distgan generator description"):
        load_generator(tmp_path)
    (tmp_path / GENERATOR_META).unlink()
    with pytest.raises(UserError, match="is missing"):
        load_generator(tmp_path / GENERATOR_WEIGHTS)


def test_generator_with_other_shape_is_refused(tmp_path):
    save_generator(
        tmp_path, Generator(ModelConfig(resolution=32, g_channels=8)), step=1, images_seen=1
    )
    meta = json.loads((tmp_path / GENERATOR_META).read_text())
    meta["model"]["g_channels"] = 16
    (tmp_path / GENERATOR_META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not hold the weights"):
        load_generator(tmp_path)


def test_only_complete_checkpoints_are_listed(tmp_path):
    state = {"step": 0, "model": ModelConfig().to_dict()}
    for step in (5, 30, 10):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        (folder / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    (tmp_path / "step-00000040").mkdir()  # no completion marker: a crash mid-write
    (tmp_path / ".staging-step-00000050").mkdir()
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000005", "step-00000010", "step-00000030"]
    assert read_trainer_state(found[-1]).step == 30
    assert read_trainer_state(found[-1]).aug_p == 0.0  # written before ADA: p starts at 0
    assert list_checkpoints(tmp_path / "missing") == []
    with pytest.raises(UserError, match="not a complete distgan checkpoint"):
        read_trainer_state(tmp_path / "step-00000040")
    (found[0] / STATE_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"is damaged \(trainer_state.json is not valid JSON \("):
        read_trainer_state(found[0])


OLD_MODEL_KEYS = ["resolution", "z_dim", "g_channels", "d_channels", "leaky_slope"]
OLD_MODEL_KEYS += ["d_spectral_norm", "d_dropout"]  # a model config before channels, z, init


def test_files_without_the_new_model_keys_load_with_the_defaults(tmp_path):
    generator = Generator(ModelConfig(resolution=32, g_channels=8, z_dim=16)).eval()
    save_generator(tmp_path, generator, step=3, images_seen=24)
    meta = json.loads((tmp_path / GENERATOR_META).read_text())
    old_model = {key: meta["model"][key] for key in OLD_MODEL_KEYS}
    old = {**meta, "model": old_model, "z_distribution": "normal(0, 1)"}
    del old["channels"]
    (tmp_path / GENERATOR_META).write_text(json.dumps(old))
    loaded, _ = load_generator(tmp_path)
    config = loaded.config
    assert (config.channels, config.z_distribution, config.init) == (3, "normal", "normal")
    z = torch.randn(2, 16)
    torch.testing.assert_close(loaded(z), generator(z), rtol=0, atol=0)
    state = {"step": 5, "model": old_model, "images_seen": 40}  # an old trainer_state.json
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert read_trainer_state(tmp_path).model == config


def test_generator_file_states_channels_and_z_distribution(tmp_path):
    config = ModelConfig(resolution=28, channels=1, z_distribution="uniform", g_channels=8)
    save_generator(tmp_path, Generator(config).eval(), step=1, images_seen=8)
    meta = json.loads((tmp_path / GENERATOR_META).read_text())
    assert meta["channels"] == 1 and meta["z_distribution"] == "uniform"
    assert meta["resolution"] == 28 and "gray" in meta["output"]
    loaded, _ = load_generator(tmp_path)
    assert loaded.config == config
    assert loaded(torch.zeros(2, config.z_dim)).shape == (2, 1, 28, 28)


@dataclasses.dataclass(kw_only=True)
class StateWithHistory(TrainerState):
    history: list = dataclasses.field(default_factory=list)


def test_a_field_with_a_default_factory_is_not_required():
    state = StateWithHistory.from_json({"step": 3, "model": ModelConfig().to_dict()})
    assert state.step == 3 and state.history == []
    with pytest.raises(ValueError, match="^lacks the field 'model'$"):
        StateWithHistory.from_json({"step": 3})


class OneProcessAccelerator:
    """What save_checkpoint asks of an Accelerator, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization):
        (Path(folder) / "model.safetensors").write_bytes(b"weights")


class FakeEMA:
    def state_dict(self):
        return {"weight": torch.zeros(2)}


class LockLost(Exception):
    pass


def test_a_checkpoint_goes_into_place_only_while_the_lock_is_held(tmp_path):
    accelerator, state = OneProcessAccelerator(), TrainerState(step=10, model=ModelConfig())
    seen = []

    def held():  # RunLock.ensure_held: it sees the checkpoint complete, not yet in place
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    final = save_checkpoint(accelerator, tmp_path, FakeEMA(), state, keep=3, ensure_held=held)
    assert seen == [[".staging-step-00000010"]] and final == tmp_path / "step-00000010"

    def lost():  # taken over: RunLock.ensure_held ends the process; here, an exception
        raise LockLost

    with pytest.raises(LockLost):
        newer = dataclasses.replace(state, step=20)
        save_checkpoint(accelerator, tmp_path, FakeEMA(), newer, keep=1, ensure_held=lost)
    assert list_checkpoints(tmp_path) == [final]  # neither the new one nor pruning
