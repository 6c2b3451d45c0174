"""Run the backup chain in this process, for set-ups without a broker: the same steps the tasks run."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from worker import notify
from worker.backup import links as backup
from worker.backup.unchanged import release_if_unchanged
from worker.coordination.locks import database_lock
from worker.errors import LockHeld, NothingChanged
from worker.pg.executors import Executor
from worker.pg.identity import server_identity
from worker.progress import Progress
from worker.settings import Settings

# The link each phase belongs to, named in a failure's notification (other phases keep the one before).
_LINKS = {"counting rows": "dump", "dumping": "dump", "verifying": "verify", "writing meta": "meta",
          "waiting for the repository": "offsite", "sending offsite": "offsite", "pruning": "prune"}


def run_backup(settings: Settings, database: str, executor: Executor, progress: Progress,
               if_changed: bool = False) -> backup.Summary:
    """The chain, with the healthcheck pings and the failure's notification (`worker.notify`), as the
    workers send them: `start` once the run holds the lock, and a database found busy at the start
    is the operator's to see, not a failure to report."""
    run_id = f"local-{uuid.uuid4()}"
    link: list[str | None] = [None]  # the link running: None until the run holds the lock

    def started() -> None:
        link[0] = "dump"
        notify.backup_started(settings, database, run_id, wait=False)  # its lane sends it before the end's

    def tracked(phase: str, fields: dict[str, Any]) -> None:
        link[0] = _LINKS.get(phase, link[0])
        progress(phase, fields)

    try:
        result = _run_backup(settings, database, executor, tracked, run_id, started, if_changed)
    except NothingChanged as unchanged:
        notify.backup_unchanged(settings, database, unchanged.record, run_id)
        raise
    except BaseException as error:
        if not (isinstance(error, LockHeld) and link[0] is None):  # busy at the start: the operator's to see
            notify.backup_failed(settings, database, run_id, error, link[0] or "start")
        raise
    notify.backup_succeeded(settings, result, run_id)
    return result


def _run_backup(settings: Settings, database: str, executor: Executor, progress: Progress, run_id: str,
                started: Callable[[], None], if_changed: bool) -> backup.Summary:
    server = server_identity(settings, executor, database)
    lock = database_lock(settings, database, run_id, server)
    run = backup.start_run(settings, database, run_id, lock, server)
    if if_changed and (unchanged := release_if_unchanged(settings, executor, database, server, lock)) is not None:
        raise NothingChanged(unchanged)
    started()
    try:
        run = backup.dump(run, settings, executor, lock, progress)
        run = backup.verify(run, settings, executor, lock, progress)
        run = backup.checksum(run, settings, lock, progress)
        progress("writing meta", {})
        run = backup.write_meta(run, settings, lock)
        if settings.repository:
            run = backup.offsite(run, settings, lock, progress)
        progress("pruning", {})
        run = backup.prune(run, settings, lock, progress)
    except BaseException:
        backup.abandon_files(run)
        raise
    finally:
        lock.release()
    return backup.summary(run)
