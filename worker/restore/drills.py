"""Restore drills: restore a backup into a scratch database, compare exact counts with its `.meta`,
drop the scratch database, and remember the outcome (`BACKUP_DIR/.<db>.last-drill.json`) for
`tma-backup status`. A drill touches nothing live and needs no token."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.archive.meta import write_atomically
from worker.coordination.locks import DatabaseLock, database_lock, kept_alive, renewal_interval
from worker.errors import BackupError, LockHeld
from worker.pg.executors import Executor
from worker.progress import PhaseClock, Progress, no_progress
from worker.restore import swap
from worker.restore.prepare import prepare
from worker.restore.scratch import default_shape, restore_into_scratch
from worker.settings import Settings


def record_path(settings: Settings, database: str) -> Path:
    return settings.backup_dir / f".{database}.last-drill.json"


def drill(settings: Settings, executor: Executor, database: str, file: str | None, lock: DatabaseLock, run: str,
          progress: Progress = no_progress) -> dict[str, Any]:
    if file is None:
        newest = catalogue.newest_complete(settings.backup_dir, database)
        if newest is None:
            raise BackupError(f"no complete backup of {database!r} in {settings.backup_dir} to drill")
        file = str(newest.path)
    started = time.monotonic()
    clock = PhaseClock(progress)
    progress = clock
    lock.acquire()
    try:
        with kept_alive(lock, renewal_interval(settings)):
            progress("checking", {})
            prepared = prepare(settings, executor, file)
            with swap.admin_connection(executor.connect_kwargs(), prepared.meta.database) as admin:
                swap.drop_leftover_scratches(admin, prepared.meta.database)
                swap.repair_refused_connections(admin, prepared.meta.database)
                shape = swap.shape_of(admin, prepared.meta.database) or default_shape(admin)
                scratch, counts = restore_into_scratch(settings, executor, admin, prepared, shape, swap.DRILL, run, progress)
                swap.drop(admin, scratch)
    finally:
        lock.release()
    return {
        "database": prepared.meta.database,
        "file": str(prepared.path),
        "tables": len(counts),
        "rows": sum(counts.values()),
        "duration_seconds": round(time.monotonic() - started, 3),
        "phase_seconds": clock.finish(),
    }


def run_and_record(settings: Settings, executor: Executor, database: str, file: str | None, run: str,
                   progress: Progress = no_progress, scheduled: bool = False) -> dict[str, Any]:
    """Run a drill and record pass or fail. A scheduled drill that finds the database busy skips."""
    lock = database_lock(settings, database, run)
    at = datetime.now(timezone.utc).strftime(catalogue.TIMESTAMP_FORMAT)
    try:
        result = drill(settings, executor, database, file, lock, run, progress)
    except LockHeld as busy:
        if scheduled:
            return {"skipped": str(busy), "database": database}
        raise
    except BackupError as error:
        _record(settings, database, {"result": "fail", "at": at, "file": file, "error": str(error)})
        raise
    _record(settings, database, {"result": "pass", "at": at, **result})
    return result


def _record(settings: Settings, database: str, outcome: dict[str, Any]) -> None:
    try:
        write_atomically(record_path(settings, database), json.dumps(outcome))
    except OSError:
        pass  # the drill's own outcome is what matters; status will say "no drill recorded"


def last_drill(settings: Settings, database: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(record_path(settings, database).read_text()))
    except (OSError, ValueError):
        return None
