"""The garbage collector around start-up imports.

A process's start is mostly imports: hundreds of thousands of objects that live as long as the process
and no garbage worth collecting. The collector would scan that growing heap again and again; instead it
is off while the modules import, and what they built is frozen (`gc.freeze`) so that no later collection
scans it. The CLI (`worker.cli.main`) and every Celery process that loads the task modules use this."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def imports_done() -> None:
    """Freeze what the imports built and collect from here on as usual."""
    gc.freeze()
    gc.enable()


@contextmanager
def importing() -> Iterator[None]:
    """The collector off for the imports inside; frozen and back on after them, whatever happened."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
