"""Progress reports of long operations (`phase`, small fields such as bytes written), and a callback
that also times each phase."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Progress = Callable[[str, dict[str, Any]], None]


def no_progress(phase: str, fields: dict[str, Any]) -> None:
    pass


class PhaseClock:
    """Forwards progress reports and times each phase, from its first report to the next phase's
    (a phase reported again later adds to its total)."""

    def __init__(self, progress: Progress = no_progress) -> None:
        self._progress = progress
        self._current: str | None = None
        self._since = time.monotonic()
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str, fields: dict[str, Any]) -> None:
        if phase != self._current:
            self._close()
            self._current = phase
        self._progress(phase, fields)

    def _close(self) -> None:
        now = time.monotonic()
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + now - self._since
        self._since = now

    def finish(self) -> dict[str, float]:
        self._close()
        self._current = None
        return {phase: round(seconds, 3) for phase, seconds in self.seconds.items()}
