"""The garbage collector around the trainer's imports (runtime/collector.py): off inside the
block, on again after it (even when the block raises, and not when it was off before), and what
the block made frozen, out of later collections."""

import gc

import pytest

from distgan.runtime.collector import collector_paused


@pytest.fixture(autouse=True)
def thawed():
    """Each test starts and ends with nothing frozen and the collector on."""
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_off_inside_then_on_with_the_block_objects_frozen():
    with collector_paused():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)
    watched = {id(item) for item in gc.get_objects()}  # the frozen ones are not among them
    assert not watched & {id(item) for item in made}


def test_on_again_when_the_block_raises():
    with pytest.raises(ImportError), collector_paused():
        raise ImportError("no such module")
    assert gc.isenabled()


def test_stays_off_when_it_was_off_before():
    gc.disable()
    with collector_paused():
        made = [[] for _ in range(10)]
    assert not gc.isenabled()
    assert not {id(item) for item in gc.get_objects()} & {id(item) for item in made}
