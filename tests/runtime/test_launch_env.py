"""Reading the launcher's mixed precision: which command lines are `accelerate launch` (console
script, `python -m`, `accelerate-launch`); its --mixed_precision in every spelling, and never the
trainer's own --mixed-precision; its config file as Accelerate finds it (--config_file, else
default_config.yaml under HF_HOME or XDG_CACHE_HOME, not with --cpu; the older `fp16: true`); the
launcher's default `no` told apart from a chosen one, or said to be unknown; and the nearest
launcher found among a real process's ancestors; the shipped Accelerate configs leave the choice
to `auto`, and a launcher's fp8 is refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config import default_config_file as accelerates_default
from accelerate.commands.config.config_args import load_config_from_file

from distgan.errors import UserError
from distgan.runtime.launch_env import (
    EXPORTED,
    LauncherPrecision,
    default_config_file,
    launch_arguments,
    launcher_precision,
)
from distgan.training.precision import choose_precision
from tests.helpers import REPO, run_train

LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no"}  # what accelerate launch exports by default
DEFAULT = LauncherPrecision(None, "accelerate launch's default no")


def write_config(path: Path, *lines: str) -> Path:
    """An Accelerate config file as `accelerate config` writes it, with `lines` added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["compute_environment: LOCAL_MACHINE", "distributed_type: 'NO'"]))
    path.write_text(path.read_text() + "\n" + "\n".join(["num_processes: 1", *lines]) + "\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "train.py"],
        ["python", "-m", "accelerate.commands.launch", "--cpu", "train.py"],
        ["/venv/bin/python", "/venv/bin/accelerate-launch", "--cpu", "train.py"],
        ["python", "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu", "train.py"],
    ],
)
def test_accelerate_launch_command_lines_are_recognised(argv):
    assert launch_arguments(argv) == ["--cpu", "train.py"]


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "launch/train.py", "--mixed-precision", "no"],
        ["python", "-m", "distgan.runtime.launcher", "--mixed_precision", "no", "launch/train.py"],
        ["/venv/bin/accelerate", "config"],
        ["bash", "-c", "accelerate launch train.py"],
    ],
)
def test_other_command_lines_are_not_a_launcher(argv):
    assert launch_arguments(argv) is None


@pytest.mark.parametrize(
    "flags, choice",
    [
        (["--mixed_precision", "no"], "no"),
        (["--mixed_precision=no"], "no"),
        (["--mixed-precision", "bf16"], "bf16"),
        (["--num_processes", "2", "--mixed_precision", "fp16", "--multi_gpu"], "fp16"),
    ],
)
def test_the_launchers_flag_is_an_explicit_choice(tmp_path, flags, choice):
    environ = {**LAUNCHED, "HF_HOME": str(tmp_path)}
    found = launcher_precision(environ, [*flags, "launch/train.py", "--max-steps", "1"])
    assert found == LauncherPrecision(choice, f"accelerate launch --mixed_precision {choice}")


def test_the_trainers_own_flag_is_not_the_launchers(tmp_path):
    environ = {**LAUNCHED, "HF_HOME": str(tmp_path)}
    arguments = ["--num_processes", "1", "launch/train.py", "--mixed-precision", "no"]
    assert launcher_precision(environ, arguments) == DEFAULT


def test_no_launcher_means_no_choice():
    assert launcher_precision({}, ["--mixed_precision", "no", "train.py"]) == (None, "")


def test_the_default_config_file_counts_unless_cpu(tmp_path):
    config = write_config(
        tmp_path / "hf" / "accelerate" / "default_config.yaml", "mixed_precision: 'no'"
    )
    environ = {**LAUNCHED, "HF_HOME": str(tmp_path / "hf")}
    found = launcher_precision(environ, ["train.py"])
    assert found == LauncherPrecision("no", f"mixed_precision 'no' in {config}")
    # accelerate launch reads the default file only without --cpu (commands/launch.py).
    assert launcher_precision(environ, ["--cpu", "train.py"]) == DEFAULT
    # Without HF_HOME, it is under XDG_CACHE_HOME/huggingface.
    xdg = write_config(tmp_path / "xdg" / "huggingface" / "accelerate" / "default_config.yaml")
    config.unlink()
    write_config(xdg, "mixed_precision: bf16")
    found = launcher_precision({**LAUNCHED, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, ["t.py"])
    assert found == LauncherPrecision("bf16", f"mixed_precision 'bf16' in {xdg}")


def test_a_given_config_file_counts_even_with_cpu(tmp_path):
    environ = {**LAUNCHED, "HF_HOME": str(tmp_path / "hf")}
    fp16 = write_config(tmp_path / "fp16.yaml", "mixed_precision: fp16")
    found = launcher_precision(environ, ["--cpu", "--config_file", str(fp16), "train.py"])
    assert found.choice == "fp16" and str(fp16) in found.source
    legacy = write_config(tmp_path / "legacy.yaml", "fp16: true")  # before mixed_precision
    assert launcher_precision(environ, ["--config-file", str(legacy), "t.py"]).choice == "fp16"
    silent = write_config(tmp_path / "silent.yaml")  # no mixed_precision key: the default
    assert launcher_precision(environ, ["--config_file", str(silent), "train.py"]) == DEFAULT
    flag_wins = ["--config_file", str(fp16), "--mixed_precision", "no", "train.py"]
    assert launcher_precision(environ, flag_wins).choice == "no"


def test_a_launchers_value_other_than_no_is_always_a_choice():
    # accelerate launch exports nothing but `no` by default, so anything else was chosen.
    environ = {"ACCELERATE_MIXED_PRECISION": "fp16"}
    found = launcher_precision(environ, ["not", "accelerate's", "--bogus"])
    assert found == LauncherPrecision("fp16", "ACCELERATE_MIXED_PRECISION=fp16")


def test_no_readable_launcher_leaves_its_no_unknown():
    # pytest runs under no accelerate launch: nothing above it to read.
    found = launcher_precision(LAUNCHED)
    assert found.choice is None and "may be the launcher's default" in found.source


def test_the_default_config_path_is_accelerates():
    assert default_config_file(os.environ) == Path(accelerates_default)


def test_the_nearest_launcher_is_found_among_the_ancestors(tmp_path):
    # A stand-in named like the console script (`.../bin/accelerate launch ...`) that starts a
    # child, which starts the trainer: the trainer reads the stand-in's flags two levels up.
    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "from distgan.runtime.launch_env import launcher_precision\nprint(launcher_precision())\n"
    )
    middle = f"import subprocess, sys; subprocess.run([sys.executable, {str(trainer)!r}])"
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {middle!r}])\n")
    command = [sys.executable, str(fake), "launch", "--mixed_precision", "no", str(trainer)]
    env = {**os.environ, **LAUNCHED, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "choice='no', source='accelerate launch --mixed_precision no'" in done.stdout


@pytest.mark.parametrize(
    "config", sorted((REPO / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_accelerate_configs_leave_the_precision_to_auto(tmp_path, monkeypatch, config):
    """Issue 20, item 3: a config's mixed_precision is the launcher's choice, which `auto`
    follows: bf16 there would give a V100 or T4 slow emulated bf16 instead of its fp16."""
    environ = {**LAUNCHED, "HF_HOME": str(tmp_path)}
    found = launcher_precision(environ, ["--config_file", str(config), "launch/train.py"])
    assert found == DEFAULT
    assert load_config_from_file(str(config)).distributed_type == "MULTI_GPU"  # still read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a V100: no native bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert choose_precision("auto", found).name == "fp16"


def test_fp8_from_the_launcher_is_refused_in_one_line(tmp_path):
    """Issue 20, item 4: `auto` would pass the launcher's fp8 to Accelerate, which fails with a
    traceback (no fp8 backend) or trains untested; an explicit --mixed-precision still wins."""
    fp8 = LauncherPrecision("fp8", "accelerate launch --mixed_precision fp8")
    with pytest.raises(
        UserError,
        match=r"^mixed precision 'fp8' \(accelerate launch --mixed_precision fp8\) is not one distgan trains in: ",
    ):
        choose_precision("auto", fp8)
    assert choose_precision("no", fp8) == ("no", "--mixed-precision, over " + fp8.source)
    result = run_train(
        "--out-dir", tmp_path / "run", "--max-steps", "1", env={EXPORTED: "fp8"}, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mixed precision 'fp8' (ACCELERATE_MIXED_PRECISION=fp8) is not one distgan trains "
        "in: leave it out of the launcher (auto then picks by the hardware), or pass "
        "--mixed-precision bf16, fp16 or no"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
