"""The CLI's broker side: dispatch a task (a backup's chain, a restore, a drill) and follow it until it
ends, within bounded time.

If the broker or the result backend goes away, the follower keeps trying for a while, then says that
it lost track (exit 1) rather than hanging. A link whose worker died (SIGKILL, OOM, a lost host) never
reports anything: the follower watches the run's database lock, which that worker kept alive, and once
the lock is gone (expired or released) while the link has not finished, it gives the link a short grace
to report, then says that it lost track of the run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.errors import BackupError, NothingChanged
from worker.progress import Progress
from worker.settings import Settings

if TYPE_CHECKING:  # Celery is imported when a command first talks to the broker, not by every command
    from celery import Celery
    from celery.result import AsyncResult

POLL_SECONDS = 0.3
LOST_TRACK_SECONDS = 60.0
NO_WORKER_SECONDS = 60.0
STEP_NAMES = ("dump", "verify", "checksum", "meta", "prune")  # a kickoff from before `step_names` existed


class LostTrack(BackupError):
    """The follower cannot learn the outcome (broker or backend unreachable for too long)."""


def sanitized(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def check_workers(app: Celery) -> list[str]:
    try:
        replies = app.control.ping(timeout=2.0, limit=1)  # one answer is enough to know a worker listens
    except Exception as error:  # kombu raises several connection error types
        raise BackupError(f"cannot reach the broker at {sanitized(app.conf.broker_url)}: {error}") from None
    if not replies:
        raise BackupError(
            "no tma-backup worker answered: start one with `celery -A worker worker -E` "
            "(or unset CELERY_BROKER_URL to run in this process)"
        )
    return [name for reply in replies for name in reply]


def dispatch(app: Celery, task_name: str, kwargs: dict[str, Any]) -> AsyncResult:
    try:
        return app.send_task(
            task_name,
            kwargs=kwargs,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1, "interval_max": 2},
        )
    except Exception as error:
        raise BackupError(f"cannot reach the broker at {sanitized(app.conf.broker_url)}: {error}") from None


def _poll(result: AsyncResult, lost_since: list[float | None], outage_seen: list[bool] | None = None) -> tuple[str, Any]:
    """(state, info) of a result; backend errors are tolerated for LOST_TRACK_SECONDS."""
    try:
        state, info = result.state, result.info
    except Exception as error:
        now = time.monotonic()
        if outage_seen is not None:
            outage_seen[0] = True
        since = lost_since[0]
        if since is None:
            since = lost_since[0] = now
        if now - since > LOST_TRACK_SECONDS:
            raise LostTrack(
                f"lost track of task {result.id}: the result backend has not answered for "
                f"{LOST_TRACK_SECONDS:.0f}s ({error}); check `tma-backup list` and the worker's log"
            ) from None
        return "UNKNOWN", None
    lost_since[0] = None
    return state, info


class RunWatch:
    """Is the run still alive? Its lock (`key`, owned by `run_id`) says so while the chain works.

    `owner_of(key)` reads the lock's owner (None when nobody holds it); it may raise when Redis is
    unreachable, which counts as "unknown", not as "gone". `check` raises LostTrack once the lock has
    been gone for `grace` seconds while a link is unfinished."""

    def __init__(self, key: str, run_id: str, owner_of: Callable[[str], str | None], grace: float) -> None:
        self.key = key
        self.run_id = run_id
        self.owner_of = owner_of
        self.grace = grace
        self._gone_since: float | None = None

    def check(self, step: str, state: str) -> None:
        try:
            owner = self.owner_of(self.key)
        except Exception:  # Redis unreachable: the result backend's own tolerance applies
            return
        if owner == self.run_id:
            self._gone_since = None
            return
        now = time.monotonic()
        if self._gone_since is None:
            self._gone_since = now
        if now - self._gone_since > self.grace:
            whose = f"run {owner} holds it now" if owner else "it expired or was released"
            raise LostTrack(
                f"lost track of backup run {self.run_id}: its lock is gone ({whose}) while the {step} link "
                f"is {state}, so the worker running it died or the broker lost the chain; the run is "
                "abandoned and the next backup removes its partial files; check `tma-backup list`"
            )


def wait_for(
    result: AsyncResult,
    deadline: float,
    on_state: Callable[[str, Any], None] | None = None,
    pending_limit: float | None = None,
    watch: Callable[[str], None] | None = None,
) -> Any:
    """Wait for one task; returns its result or raises BackupError with the task's own message.
    `watch(state)` runs on every poll while the task is unfinished and may raise LostTrack."""
    lost_since: list[float | None] = [None]
    outage_seen = [False]
    pending_since = time.monotonic()
    last: tuple[str, Any] | None = None
    while True:
        state, info = _poll(result, lost_since, outage_seen)
        if on_state and (state, info) != last:
            on_state(state, info)
        last = (state, info)
        if state == "SUCCESS":
            return info
        if state in ("FAILURE", "REVOKED"):
            raise BackupError(str(info) if info else f"task {result.id} {state.lower()}")
        if watch is not None:
            watch(state)
        if state == "PENDING" and pending_limit and time.monotonic() - pending_since > pending_limit:
            if outage_seen[0]:
                raise LostTrack(
                    f"lost track of task {result.id}: Redis was unreachable meanwhile and still knows nothing "
                    f"of it {pending_limit:.0f}s later (restarted without persistence?); check `tma-backup list` "
                    "and the worker's log before starting another backup"
                )
            raise LostTrack(
                f"task {result.id} was not picked up within {pending_limit:.0f}s; is a worker running "
                "and consuming the tma_backup queue?"
            )
        if state != "PENDING":
            pending_since = time.monotonic()
        if time.monotonic() > deadline:
            raise LostTrack(f"gave up following task {result.id} after FOLLOW_TIMEOUT; it may still be running")
        time.sleep(POLL_SECONDS)


def follow_backup(
    app: Celery,
    kickoff: AsyncResult,
    timeout: float,
    on_event: Callable[[str, str, Any], None],
    owner_of: Callable[[str], str | None] | None = None,
    lock_grace: float = 30.0,
) -> dict[str, Any]:
    """Follow `tma_backup.backup` and then each link of the chain it started; returns the final summary.

    With `owner_of` (reads a lock's owner in Redis), a run whose lock disappears while a link is
    unfinished is reported as lost after `lock_grace` seconds instead of being waited for until
    `timeout`."""
    deadline = time.monotonic() + timeout
    started = wait_for(kickoff, deadline, pending_limit=NO_WORKER_SECONDS)
    if "skipped" in started:
        raise BackupError(started["skipped"])
    if "unchanged" in started:
        raise NothingChanged(started["unchanged"])
    on_event("kickoff", "SUCCESS", started)
    steps = started["steps"]
    run_watch = (
        RunWatch(started["lock"], started["run_id"], owner_of, lock_grace)
        if owner_of is not None and started.get("lock")
        else None
    )
    summary: dict[str, Any] = {}
    for name, step_id in zip(started.get("step_names") or STEP_NAMES, steps, strict=False):
        summary = wait_for(
            app.AsyncResult(step_id),
            deadline,
            functools.partial(on_event, name),
            watch=functools.partial(run_watch.check, name) if run_watch else None,
        )
    return summary


def call_task(settings: Settings, task: str, kwargs: dict[str, Any], host: str | None,
              masked: dict[str, Any] | None = None, on_progress: Progress | None = None) -> Any:
    """Run a task through the broker and wait for it; the CLI follows progress events."""
    from worker import app
    from worker.celery_app import host_queue

    check_workers(app)
    options: dict[str, Any] = {**({"queue": host_queue(host)} if host else {}), "retry": True, "retry_policy": {"max_retries": 3}}
    if masked is not None:
        options["kwargsrepr"] = repr(masked)
    result = app.send_task(task, kwargs=kwargs, **options)

    def on_state(state: str, info: Any) -> None:
        if on_progress and state == "PROGRESS" and isinstance(info, dict):
            on_progress(str(info.get("phase")), info)

    return wait_for(result, time.monotonic() + settings.FOLLOW_TIMEOUT, on_state, pending_limit=60)
