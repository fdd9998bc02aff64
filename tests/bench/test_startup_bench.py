"""The start-up benchmark (bench/startup.py, `python -m bench.startup`): one round on generated
images times every command as a fresh process, writes its JSON and a table with the goals, and a
command that fails stops it with that command's error."""

import json

import pytest

from bench import startup
from distgan.errors import UserError
from tests.helpers import run_module, write_images


@pytest.mark.slow
def test_one_round_times_each_command_and_writes_json(tmp_path):
    data = tmp_path / "data"
    write_images(data, 20, size=(32, 32))
    out = tmp_path / "results"
    result = run_module(
        "bench.startup", "--rounds", "1", "--data-dir", data, "--out", out, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("startup-*.json")
    seconds = json.loads(path.read_text())["seconds"]
    assert set(seconds) == {
        "import torch (the floor)",
        "train --help",
        "distgan --help",
        "1-step run",
    }
    assert all(len(figure["all"]) == 1 and figure["median"] > 0 for figure in seconds.values())
    # A step trains after torch has loaded: the run cannot be quicker than the import alone.
    assert seconds["1-step run"]["median"] > seconds["import torch (the floor)"]["median"]
    assert "| 1-step run |" in result.stdout and "≤ 4.0 s:" in result.stdout


def test_a_failing_command_names_its_error(tmp_path):
    with pytest.raises(UserError, match="failed: .*data_dir .* does not exist"):
        startup.run_once(
            startup.commands(["--data-dir", str(tmp_path / "none")], tmp_path)["1-step run"]
        )
