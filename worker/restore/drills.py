"""Restore drills: restore a backup into a scratch database, compare exact counts with its `.meta`,
drop the scratch database, and remember the outcome (`BACKUP_DIR/.<db>.last-drill.json`) for
`tma-backup status`. A drill touches nothing live and needs no token.

A drill works on one database: the one its backup belongs to. A named FILE's `.meta` says which (read
before the lock is taken); without FILE it is the newest complete backup of `--database` or DB_NAME.
That database's lock is held throughout, its leftovers are cleaned up under it, and the outcome is
recorded under its name, never under another database's."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from worker import notify
from worker.archive import catalogue
from worker.archive.meta import MetaError, read_meta
from worker.coordination.locks import DatabaseLock, database_lock, held, renewal_interval
from worker.errors import BackupError, LockHeld, VerificationFailed
from worker.pg.executors import Executor
from worker.pg.identity import server_identity
from worker.progress import PhaseClock, Progress, no_progress
from worker.restore import swap
from worker.restore.drill_record import record_drill
from worker.restore.prepare import prepare, resolve_backup_file
from worker.restore.scratch import default_shape, restore_into_scratch
from worker.settings import Settings, check_database_name

# A scheduled drill that finds the database busy (its minute's backup) waits this long, polling, then skips.
BUSY_WAIT_SECONDS = 30 * 60
BUSY_POLL_SECONDS = 5.0


class NothingToDrill(BackupError):
    """No complete backup of the database here (or, from the repository, no set of it): nothing to drill yet."""


def database_of_backup(settings: Settings, executor: Executor, file: str, given: str | None = None) -> str:
    """The database FILE is a backup of, from its `.meta`, read without touching any database. A file
    without a readable `.meta` is refused as `prepare` refuses it; `given` (an operator's --database)
    that names another database is refused. Either way nothing has been touched."""
    path = resolve_backup_file(settings, file)
    try:
        owner = read_meta(catalogue.meta_path(path)).database
    except MetaError:
        owner = prepare(settings, executor, file).meta.database  # raises: its .meta is missing or unreadable
    try:
        check_database_name(owner)
    except ValueError as error:
        raise VerificationFailed(
            f"{path.name}: its .meta names the database {owner!r}, which {error}; refused") from None
    if given is not None and given != owner:
        raise BackupError(f"drill refused: {path.name} is a backup of {owner!r}, not of {given!r} (--database); "
                          "nothing was touched")
    return owner


def drill(settings: Settings, executor: Executor, database: str, file: str | None, lock: DatabaseLock, run: str,
          progress: Progress = no_progress) -> dict[str, Any]:
    """Drill `file` (default: the newest complete backup of `database`) under `lock`, the lock of
    `database`, which must be the database the file belongs to."""
    if file is None:
        newest = catalogue.newest_complete(settings.backup_dir, database)
        if newest is None:
            raise NothingToDrill(f"no complete backup of {database!r} in {settings.backup_dir} to drill")
        file = str(newest.path)
    started = time.monotonic()
    clock = PhaseClock(progress)
    progress = clock
    with held(lock, renewal_interval(settings)):
        progress("checking", {})
        prepared = prepare(settings, executor, file)
        if prepared.meta.database != database:  # the .meta changed since it was read, or a misnamed file
            raise BackupError(f"drill refused: {prepared.path.name} is a backup of {prepared.meta.database!r}, "
                              f"not of {database!r}; nothing was touched")
        with swap.admin_connection(executor.connect_kwargs(), database) as admin:
            lock.confirm()  # right before dropping what a crashed run of this database left
            swap.drop_leftover_scratches(admin, database)
            swap.repair_refused_connections(admin, database)
            shape = swap.shape_of(admin, database) or default_shape(admin)
            scratch, counts = restore_into_scratch(settings, executor, admin, prepared, shape, swap.DRILL, run, progress)
            swap.drop(admin, scratch)
    return {
        "database": prepared.meta.database,
        "file": str(prepared.path),
        "tables": len(counts),
        "rows": sum(counts.values()),
        "duration_seconds": round(time.monotonic() - started, 3),
        "phase_seconds": clock.finish(),
    }


def run_and_record(settings: Settings, executor: Executor, database: str | None, file: str | None, run: str,
                   progress: Progress = no_progress, scheduled: bool = False,
                   from_repository: str | None = None) -> dict[str, Any]:
    """Run a drill and record pass or fail under the drilled database. With FILE that is the database of
    its `.meta` (`database`, when given, must agree); without, `database` or DB_NAME. A FILE whose
    database cannot be told, or a disagreeing `database`, is refused before anything is touched, and
    recorded nowhere. A scheduled drill that finds the database busy waits for it (up to BUSY_WAIT_SECONDS:
    with sets every few minutes its minute is a backup's too), then skips; one that finds nothing to drill
    yet (no backup, no set: a fresh install) skips too, recording nothing (`status` says no drill was
    recorded yet, and the missing backup or set is its own problem there).

    `from_repository` (`latest` or a set id) drills the off-site copy: the set is fetched and checked
    first (a set that cannot be fetched is a failed drill), and a fetched file that was not here before
    is removed again afterwards."""
    if from_repository is not None:
        return _drill_from_repository(settings, executor, database, from_repository, run, progress, scheduled)
    if file is None:
        database = database or settings.DB_NAME
    else:
        database = database_of_backup(settings, executor, file, database)
    server = server_identity(settings, executor, database)
    at = datetime.now(timezone.utc).strftime(catalogue.TIMESTAMP_FORMAT)
    waited_until = time.monotonic() + BUSY_WAIT_SECONDS
    try:
        while True:
            lock = database_lock(settings, database, run, server)
            try:
                result = drill(settings, executor, database, file, lock, run, progress)
                break
            except LockHeld as busy:
                # A scheduled drill's minute is often a backup's too (sets every few minutes): wait for it.
                if not scheduled or time.monotonic() >= waited_until:
                    raise
                progress("waiting for the database", {"holder": str(busy)})
                time.sleep(BUSY_POLL_SECONDS)
    except LockHeld as busy:
        if scheduled:
            return {"skipped": str(busy), "database": database}
        raise
    except BackupError as error:
        if scheduled and isinstance(error, NothingToDrill):
            return {"skipped": f"nothing to drill yet: {error}", "database": database}
        record_drill(settings, database, {"result": "fail", "at": at, "file": file, "error": str(error)})
        notify.drill_failed(settings, database, error, run, file)
        raise
    record_drill(settings, database, {"result": "pass", "at": at, **result})
    notify.drill_passed(settings, result, run)  # only with NOTIFY_ON=all
    return result


def _drill_from_repository(settings: Settings, executor: Executor, database: str | None, reference: str, run: str,
                           progress: Progress, scheduled: bool) -> dict[str, Any]:
    from worker.repository.fetch import fetch
    from worker.repository.sets import NoSet

    database = database or settings.DB_NAME
    at = datetime.now(timezone.utc).strftime(catalogue.TIMESTAMP_FORMAT)
    try:
        fetched = fetch(settings, reference, database, run, progress)
    except BackupError as error:
        if scheduled and isinstance(error, NoSet):
            return {"skipped": f"nothing to drill yet: {error}", "database": database}
        record_drill(settings, database, {"result": "fail", "at": at, "file": None, "from_repository": reference,
                                     "error": str(error)})
        notify.drill_failed(settings, database, error, run, from_repository=reference)
        raise
    try:
        result = run_and_record(settings, executor, fetched["database"], fetched["file"], run, progress, scheduled)
    finally:
        if not fetched["already_local"]:
            dump = settings.backup_dir / fetched["file"]
            catalogue.delete_files([dump, catalogue.meta_path(dump)])
    result["from_repository"] = {key: fetched[key] for key in ("set", "seconds", "already_local")}
    if "skipped" not in result:
        record_drill(settings, fetched["database"], {"result": "pass", "at": at, **result})
    return result
