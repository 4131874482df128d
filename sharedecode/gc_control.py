"""Postpone Python's full garbage collections while requests run.

A full (generation 2) collection walks every container object the process holds: the model's
modules, the compiler's caches, earlier results. On the GPU machine one of them took 1.2 s in the
middle of a 0.6 s generation (`bench/step_timeline.py`, W-shared 256). The young generations still
run, so short-lived cycles are still freed; the postponed full collection runs at its first chance
after the last generation ends.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0  # nested or concurrent generations: only the outermost sets and restores
_saved: tuple[int, int, int] | None = None
NO_FULL_COLLECTION = 2**30  # generation-1 collections before a full one: never, in practice


@contextmanager
def full_collections_postponed() -> Iterator[None]:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], _saved[1], NO_FULL_COLLECTION)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
