"""Delivery that can never fail or hold up a run for long: every message and ping goes to a background
thread of this process (pings in one ordered lane, so `start` always goes before `fail`; messages in
another); the caller waits at most NOTIFY_TIMEOUT for their first attempt and returns. A failed or
unanswered attempt is one warning line (`worker.notify` logger: the worker's log; `[WARN]` in the CLI),
then a few retries in the background while the process lives. Nothing here raises into its caller."""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from worker.errors import first_line
from worker.notify.scrub import scrub_text
from worker.settings import Settings

log = logging.getLogger("worker.notify")

# After a failed first attempt: this many more, this long apart; then the message is given up (logged).
RETRY_DELAYS = (5.0, 20.0, 60.0)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def never_raises(function: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """Notifications are best effort: whatever goes wrong here is one warning, never the caller's failure."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            log.warning("notification not sent (%s: %s)", type(error).__name__, scrub_text(first_line(error)))
            return None

    return wrapper


class DeliveryFailed(Exception):
    """One attempt to deliver a message or a ping failed; the message says why (no URL in it)."""


class Job:
    def __init__(self, what: str, send: Callable[[], None], key: str | None = None) -> None:
        self.what = what  # "the healthcheck ping /fail (https://hc-ping.com/…)": never a secret
        self.send = send
        self.key = key  # pings of one run: a newer one makes an older one's pending retry pointless
        self.attempted = threading.Event()
        self.tries = 0
        self._warned = False
        self._guard = threading.Lock()

    def warn_once(self, message: str) -> None:
        with self._guard:
            if self._warned:
                return
            self._warned = True
        log.warning("%s", scrub_text(message))


class Lane:
    """One background thread sending jobs in order, retrying failed ones later (per process: a forked
    Celery pool child starts its own)."""

    def __init__(self, name: str, supersede: bool) -> None:
        self.name = name
        self.supersede = supersede
        self._pid: int | None = None
        self._queue: queue.Queue[Job] = queue.Queue()

    def submit(self, job: Job) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = queue.Queue()
            threading.Thread(target=self._run, args=(self._queue,), name=f"tma-backup-{self.name}",
                             daemon=True).start()
        self._queue.put(job)

    def _run(self, jobs: queue.Queue[Job]) -> None:
        delayed: list[tuple[float, int, Job]] = []
        order = itertools.count()
        while True:
            try:
                timeout = max(0.0, delayed[0][0] - time.monotonic()) if delayed else None
                try:
                    job = jobs.get(timeout=timeout)
                except queue.Empty:
                    job = heapq.heappop(delayed)[2]
                else:
                    if self.supersede and job.key is not None:
                        superseded = [entry for entry in delayed if entry[2].key == job.key]
                        for entry in superseded:
                            log.info("not retrying %s: %s supersedes it", entry[2].what, job.what)
                        delayed = [entry for entry in delayed if entry[2].key != job.key]
                        heapq.heapify(delayed)
                retry_in = _attempt(job)
                if retry_in is not None:
                    heapq.heappush(delayed, (time.monotonic() + retry_in, next(order), job))
            except Exception:  # never let the lane die: the next job still goes out
                log.warning("notification thread: unexpected error; going on")


def _attempt(job: Job) -> float | None:
    """Try once; the delay before the next try, or None (delivered, or given up)."""
    try:
        job.send()
    except Exception as error:
        job.tries += 1
        reason = first_line(error)
        left = len(RETRY_DELAYS) - job.tries + 1
        if job.tries == 1:
            job.warn_once(f"could not deliver {job.what}: {reason}; trying again in the background "
                          f"({left} more tries at most)")
        else:
            log.info("%s", scrub_text(f"try {job.tries} of {job.what} failed: {reason}"
                                      + ("" if left > 0 else "; given up")))
        job.attempted.set()
        return RETRY_DELAYS[job.tries - 1] if left > 0 else None
    if job.tries:
        log.info("%s delivered on try %d", job.what, job.tries + 1)
    job.attempted.set()
    return None


PINGS = Lane("pings", supersede=True)
MESSAGES = Lane("notifications", supersede=False)


def _reset_after_fork() -> None:  # a pool child: its parent's threads are not there
    for lane in (PINGS, MESSAGES):
        lane._pid = None


os.register_at_fork(after_in_child=_reset_after_fork)


def deliver(settings: Settings, jobs: list[tuple[Lane, Job]], wait: bool = True) -> None:
    """Hand the jobs to their lanes; wait at most NOTIFY_TIMEOUT, in all, for their first attempts."""
    for lane, job in jobs:
        lane.submit(job)
    if not wait:
        return
    deadline = time.monotonic() + settings.NOTIFY_TIMEOUT
    for _, job in jobs:
        if not job.attempted.wait(max(0.0, deadline - time.monotonic())):
            job.warn_once(f"{job.what} not delivered within NOTIFY_TIMEOUT ({settings.NOTIFY_TIMEOUT:g}s): "
                          "left to the background (a few more tries while this process runs)")
