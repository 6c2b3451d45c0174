"""Crash and pause points for the fault tests. Unset (always, in production) they do nothing.

- `TMA_BACKUP_CRASH_AT=<point>` makes this process die by SIGKILL right there, as a power cut or an
  OOM kill would.
- `TMA_BACKUP_PAUSE_AT=<point>|<seconds>|<file>` writes `<file>` there and sleeps, so that a test can
  do something at that exact moment (take the lock away, fill the disk) before the run goes on.

Used only where a real fault cannot be timed from outside: between the steps of a restore."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

VARIABLE = "TMA_BACKUP_CRASH_AT"
PAUSE_VARIABLE = "TMA_BACKUP_PAUSE_AT"


def crash_point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, rest = os.environ.get(PAUSE_VARIABLE, "").partition("|")
    if point == name:
        seconds, _, marker = rest.partition("|")
        Path(marker).write_text(str(os.getpid()))
        time.sleep(float(seconds))
