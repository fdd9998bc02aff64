"""The small shared helpers: atomic writes (distgan.runtime.files: the file appears whole with its content,
no temporary file is left, a failing writer leaves the previous file as it was, the writer's
result is passed back) and first_line (distgan.errors: the first line of an error message, cut to
a limit, or the exception's type name when the message is empty)."""

import json

import numpy as np
import pytest

from distgan.errors import first_line
from distgan.runtime.files import write_atomically, write_json_atomically, write_text_atomically


def test_the_file_appears_whole_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "notes.txt"
    write_text_atomically(path, "first\n")
    write_text_atomically(path, "second, longer\n")  # replaces it
    assert path.read_text() == "second, longer\n"
    state = {"step": 3, "lr": [1e-4, 2e-4]}
    write_json_atomically(tmp_path / "state.json", state, indent=2)
    assert (tmp_path / "state.json").read_text() == json.dumps(state, indent=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "state.json"]


def test_the_temporary_file_keeps_the_suffix_and_the_result_comes_back(tmp_path):
    seen = []

    def save(tmp):
        seen.append(tmp)
        np.savez(tmp, x=np.arange(3))  # numpy appends .npz unless the name ends with it
        return "checked"

    path = tmp_path / "stats.npz"
    assert write_atomically(path, save) == "checked"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".stats.npz.tmp-")
    assert seen[0].suffix == ".npz" and not seen[0].exists()
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_previous_file_and_no_temporary_file(tmp_path, error):
    path = tmp_path / "grid.png"
    path.write_bytes(b"the previous grid")

    def write_half(tmp):
        tmp.write_bytes(b"half a")
        raise error

    with pytest.raises(type(error)):
        write_atomically(path, write_half)
    assert path.read_bytes() == b"the previous grid"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_a_failing_writer_without_a_previous_file_leaves_nothing(tmp_path):
    def fail(tmp):
        tmp.write_text("{")
        raise ValueError("not JSON")

    with pytest.raises(ValueError, match="not JSON"):
        write_atomically(tmp_path / "new.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_first_line_of_a_multi_line_message():
    err = RuntimeError("  \nError in loading state_dict:\n\tsize mismatch for net.0.weight\n")
    assert first_line(err) == "Error in loading state_dict:"


def test_first_line_of_an_empty_message_is_the_type_name():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(ValueError("   \n ")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"


def test_first_line_is_cut_to_the_limit():
    err = OSError("x" * 500 + "\nsecond line")
    assert first_line(err) == "x" * 200
    assert first_line(err, 160) == "x" * 160
    assert first_line(OSError("short"), 160) == "short"
    assert (
        first_line(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"
    )
