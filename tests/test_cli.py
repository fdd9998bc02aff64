"""The `distgan` command (distgan/cli.py) and the one error -> exit-status wrapper
(distgan.errors.exit_on_user_error).

`distgan --help` lists every subcommand, one line each, and imports neither torch nor any
command's module; each subcommand is the real command with the user's arguments unchanged (the
same help as `python -m MODULE --help`, `distgan env` the same report, `distgan data scan` on a
folder made here, `distgan generate` torch-free from outside the checkout, where only the
installed packages can be imported); an unknown subcommand is one `error:` line and status 2. The
wrapper turns a UserError into `error: MESSAGE` on stderr and status 2, without a traceback, and
lets every other error through.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from distgan import cli
from distgan.errors import UserError, exit_on_user_error
from tests.helpers import REPO, linear_onnx_generator, run_module, write_images

SCRIPT = Path(sysconfig.get_path("scripts")) / "distgan"
COMMAND_MODULES = {  # what each subcommand runs: the module and what goes before the user's args
    "train": ("distgan.training.cli", []),
    "evaluate": ("distgan.metrics.evaluate", []),
    "hub": ("distgan.outputs.hub", []),
    "data": ("distgan.data.loader", []),
    "env": ("distgan.runtime.env", []),
    "launch": ("distgan.runtime.launcher", []),
    "export": ("export.__main__", []),
    "generate": ("export.__main__", ["generate"]),
}


def distgan(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """The installed `distgan` script, as a user runs it."""
    assert SCRIPT.is_file(), f"no {SCRIPT}: run `pip install -e .` again for the distgan script"
    command = [str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def run_main(main, argv) -> tuple[str, int]:
    """stdout and exit status of `main(argv)`, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(argv)
        raise SystemExit(0)  # a main that returns
    return out.getvalue(), exited.value.code or 0


def test_help_lists_every_command_and_imports_none_of_them():
    result = distgan("--help", cwd=Path("/"))
    assert result.returncode == 0 and result.stderr == ""
    listed = re.findall(r"^  (\S+)  +\S", result.stdout, flags=re.MULTILINE)
    assert listed == list(COMMAND_MODULES) == list(cli.COMMANDS)
    code = (
        "import sys\nfrom distgan.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        f"heavy = {sorted({m for m, _ in COMMAND_MODULES.values()} | {'torch', 'numpy'})!r}\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[-1] == "[]"
    bare = distgan()  # no command: the same list, and a failing status
    assert bare.returncode == 2 and bare.stdout == result.stdout


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_each_command_is_the_modules_own_with_the_arguments_unchanged(name):
    module, prefix = COMMAND_MODULES[name]
    assert (cli.COMMANDS[name].module, list(cli.COMMANDS[name].prefix)) == (module, prefix)
    main = importlib.import_module(module).main
    assert run_main(cli.main, [name, "--help"]) == run_main(main, [*prefix, "--help"])


def test_env_prints_the_same_report():
    before = run_module("distgan.runtime.env")
    after = distgan("env")
    assert after.returncode == before.returncode and after.returncode in (0, 1)
    assert same_report(after.stdout) == same_report(before.stdout) and "torch " in after.stdout


def same_report(text: str) -> str:
    """The env report without its free-memory figure, which moves between two runs."""
    return re.sub(r"[\d.]+ GiB available", "N GiB available", text)


def test_data_scan_lists_the_bad_files_and_names_a_missing_folder(tmp_path):
    folder = tmp_path / "faces"
    write_images(folder, 12)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    result = distgan("data", "scan", folder)
    assert result.returncode == 1, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"{folder / 'broken.jpg'}: ") and "not an image" in line
    assert "13 images, 1 bad" in result.stderr
    missing = distgan("data", "scan", tmp_path / "nowhere")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"error: data_dir {tmp_path / 'nowhere'} does not exist: check the --data-dir path"
    ]


def test_generate_runs_torch_free_from_the_installed_packages(tmp_path):
    """From outside the checkout only installed packages import: export/ must be one of them."""
    model = tmp_path / "linear.onnx"
    linear_onnx_generator(model, z_dim=8, resolution=4, channels=3)
    out = tmp_path / "images"
    code = (
        "import sys\nfrom distgan.cli import main\n"
        f"main(['generate', '--model', r'{model}', '--seeds', '0-2', '--out-dir', r'{out}'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"wrote 3 images to {out}", "[]"]
    assert sorted(p.name for p in out.iterdir()) == ["seed0000.png", "seed0001.png", "seed0002.png"]
    help_ = distgan("generate", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "--truncation-psi" in help_.stdout
    missing = distgan("generate", "--model", tmp_path / "no.onnx", "--num", "1", "--out-dir", out)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"error: model {tmp_path / 'no.onnx'} does not exist: export one with `python -m export onnx`"
    ]


def test_train_help_is_the_trainers():
    result = distgan("train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: launch/train.py") and "--resolution" in result.stdout


@pytest.mark.parametrize("name", ["trian", "--bogus", "Train"])
def test_an_unknown_command_is_one_error_line(name):
    result = distgan(name, "--help", cwd=Path("/"))
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: unknown command {name!r}") and "train, evaluate" in line


def test_python_m_distgan_is_the_same_command():
    assert run_module("distgan", "--help").stdout == distgan("--help").stdout
    typo = run_module("distgan", "trian")
    assert typo.returncode == 2 and "(did you mean train?)" in typo.stderr


def test_the_wrapper_turns_a_user_error_into_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exited, exit_on_user_error():
        raise UserError("--num 0: use 1 or more")
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", "error: --num 0: use 1 or more\n")
    with pytest.raises(KeyError), exit_on_user_error():  # anything else passes through
        raise KeyError("a bug")
    with pytest.raises(SystemExit) as exited, exit_on_user_error(OSError, ValueError):
        raise FileNotFoundError("data_dir x does not exist")  # the kinds given instead
    assert (
        exited.value.code == 2 and capsys.readouterr().err == "error: data_dir x does not exist\n"
    )

    @exit_on_user_error()
    def main(argv):
        raise UserError(f"bad {argv[0]}")

    with pytest.raises(SystemExit) as exited:
        main(["--flag"])
    assert exited.value.code == 2 and capsys.readouterr().err == "error: bad --flag\n"
    code = (
        "from distgan.errors import UserError, exit_on_user_error\n"
        "with exit_on_user_error():\n    raise UserError('no such run: pass --run OUT_DIR')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: no such run: pass --run OUT_DIR\n"  # no traceback
