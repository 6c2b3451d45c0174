"""Child processes that must not outlive the worker that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: if the worker process that started this tool dies (SIGKILL, the OOM
    killer), the kernel kills the tool too, so no orphaned pg_dump holds table locks or writes on."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
