"""Asking the worker hosts: `status`, `list` and `verify` with a broker run where the backups are.

Every worker consumes the queue of its own host (`worker.celery_app.host_queue`). The CLI finds the
hosts by asking the workers which queues they consume (a broadcast, answered within DISCOVER_SECONDS
even while their pool is busy), sends the look-only task to each host's queue, and waits for each
answer. A request that no worker of its host takes within PICKUP_SECONDS expires unread: that host
"did not answer", it never runs late.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from worker.cli.follow import sanitized
from worker.errors import BackupError, first_line
from worker.settings import Settings

DISCOVER_SECONDS = 2.0
PICKUP_SECONDS = 30.0
POLL_SECONDS = 0.2


@dataclass
class HostAnswer:
    host: str
    result: Any = None
    error: str | None = None  # the task failed: its one line
    silent: str | None = None  # no answer: why

    @property
    def answered(self) -> bool:
        return self.error is None and self.silent is None


def worker_hosts(settings: Settings, command: str, chosen: str | None = None) -> list[str]:
    """The hosts whose queue some worker consumes (or `chosen`, which must be one of them)."""
    from worker import app
    from worker.celery_app import host_queue

    url = settings.broker_url or ""
    local = f"`tma-backup {command} --local` looks at this machine's BACKUP_DIR instead"
    try:
        with app.connection_for_write(url) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=5)
            replies = app.control.inspect(timeout=DISCOVER_SECONDS, connection=connection).active_queues() or {}
    except Exception as error:  # kombu and redis raise several connection error types
        raise BackupError(f"cannot reach the broker at {sanitized(url)}: {first_line(error).rstrip('.')}; {local}") from None
    prefix = host_queue("")
    hosts = sorted({
        str(queue["name"])[len(prefix):]
        for queues in replies.values() if isinstance(queues, list)
        for queue in queues if isinstance(queue, dict) and str(queue.get("name", "")).startswith(prefix)
    })
    if not hosts:
        raise BackupError(f"no tma-backup worker answered on the broker at {sanitized(url)} within "
                          f"{DISCOVER_SECONDS:g} s: start one (`celery -A worker worker -E`), or {local}")
    if chosen is None:
        return hosts
    if chosen not in hosts:
        raise BackupError(f"--host {chosen}: no worker consumes that host's queue (workers answered for: "
                          f"{', '.join(hosts)})")
    return [chosen]


def ask_hosts(settings: Settings, hosts: list[str], task: str, kwargs: dict[str, Any],
              answer_seconds: float) -> list[HostAnswer]:
    """Send `task` to each host's queue, then wait for every answer (at most `answer_seconds` in all)."""
    from worker import app
    from worker.celery_app import host_queue

    url = settings.broker_url or ""
    sent = {}
    try:
        with app.connection_for_write(url) as connection:
            for host in hosts:
                sent[host] = app.send_task(task, kwargs=kwargs, queue=host_queue(host), expires=PICKUP_SECONDS,
                                           connection=connection, retry=True, retry_policy={"max_retries": 2})
    except Exception as error:
        raise BackupError(f"cannot reach the broker at {sanitized(url)}: {first_line(error)}") from None
    started = time.monotonic()
    return [_wait(host, result, started, started + answer_seconds) for host, result in sent.items()]


def _not_taken(host: str) -> str:
    return (f"no worker of host {host} took the request within {PICKUP_SECONDS:g} s: every pool process busy "
            "(a long backup, restore or drill) or stopped; `--local` on that host reads its folder directly")


def _wait(host: str, result: Any, started: float, deadline: float) -> HostAnswer:
    try:
        while True:
            try:
                state = result.state
            except Exception:  # the result backend blinked: try again until the deadline
                state = "UNKNOWN"
            if state == "SUCCESS":
                return HostAnswer(host, result=result.result)
            if state == "FAILURE":
                return HostAnswer(host, error=str(result.info) or f"task {result.id} failed")
            if state == "REVOKED":
                return HostAnswer(host, silent=_not_taken(host))
            now = time.monotonic()
            if state in ("PENDING", "UNKNOWN") and now - started > PICKUP_SECONDS + 2:
                return HostAnswer(host, silent=_not_taken(host))
            if now > deadline:
                return HostAnswer(host, silent=f"host {host} gave no answer within {deadline - started:.0f} s")
            time.sleep(POLL_SECONDS)
    finally:
        try:
            result.forget()
        except Exception:  # best effort: the result expires by itself (result_expires)
            pass
