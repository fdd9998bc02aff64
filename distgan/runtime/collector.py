"""Python's cyclic garbage collector around a run's start: torch, its compiler (which the first
torch.optim optimizer imports), DALI and Accelerate load a great many long-lived objects and next
to no garbage. Each full collection during those imports walks everything loaded so far, and the
interpreter walks it all again in its final collections at exit; on a short run on a small CPU,
the collector's walks cost as much as the training. bench/startup.py measures it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off for the block (imports), then what the block made frozen: kept out of
    every later collection, the one at exit included, as long-lived objects are anyway. The
    collector is on again afterwards, whatever the block raised, unless it was off before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
