"""Child processes that must not outlive the worker that started them."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1

# The process that forks: recorded just before each fork, so the child knows whom it must outlive no
# longer. (`subprocess` runs these hooks when it calls a preexec_fn.)
_forked_by = os.getpid()


def _remember_forking_process() -> None:
    global _forked_by
    _forked_by = os.getpid()


os.register_at_fork(before=_remember_forking_process)


def die_with_parent() -> None:
    """In the child, before exec: if the worker process that started this tool dies (SIGKILL, the OOM
    killer), the kernel kills the tool too, so no orphaned pg_dump holds table locks or writes on.

    The kernel only watches from the prctl on: a parent killed between the fork and here would leave the
    tool running unwatched (with a restic lock that nobody removes), so the child checks it still has its
    parent and, if not, dies as the kernel would have made it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forked_by:
        os.kill(os.getpid(), signal.SIGKILL)
