"""Crash points for the fault tests: `TMA_BACKUP_CRASH_AT=<point>` makes this process die by SIGKILL
right there, as a power cut or an OOM kill would. Unset (always, in production) it does nothing.

Used only where a real crash cannot be timed from outside: between the steps of the swap."""

from __future__ import annotations

import os
import signal

VARIABLE = "TMA_BACKUP_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
