"""The main process decides and every process follows (runtime/agree.py): its result, or its
UserError, reaches every process; any other error on it is sent to the others before it is
raised, so none waits for a process that has stopped."""

import pytest

from distgan.errors import UserError
from distgan.runtime import agree
from distgan.runtime.agree import main_decides


class OneProcess:
    is_main_process, num_processes = True, 1


def test_main_decides_passes_results_and_user_errors_on():
    assert main_decides(OneProcess(), lambda: 7) == 7

    def refuse():
        raise UserError("no")

    with pytest.raises(UserError, match="^no$"):
        main_decides(OneProcess(), refuse)


class MainOfTwo:
    is_main_process, num_processes = True, 2


class OtherOfTwo:
    is_main_process, num_processes = False, 2


def test_main_decides_tells_the_others_of_an_interrupt(monkeypatch):
    sent = []
    monkeypatch.setattr(agree, "broadcast_object_list", lambda objects: sent.append(objects))

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        main_decides(MainOfTwo(), interrupted)
    assert sent == [[None, ("other", "KeyboardInterrupt: ")]]  # sent before raising

    def receive(objects):
        objects[:] = sent[0]

    monkeypatch.setattr(agree, "broadcast_object_list", receive)
    with pytest.raises(RuntimeError, match="^the main process failed: KeyboardInterrupt: $"):
        main_decides(OtherOfTwo(), pytest.fail)
