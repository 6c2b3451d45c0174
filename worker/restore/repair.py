"""Repair what an interrupted restore, rollback or drill left behind, without waiting for the next one.

A crash between "refuse connections" and the end of the swap leaves the live database marked
(`tma_backup.swap_in_progress`) and refusing connections; a crash before the swap leaves scratch or
drill databases. Both are found by the markers `swap` puts on them (the setting; the comment
`tma-backup:<role>:<live>:<run>`), never by guessing from names. Each database is repaired under its
own lock: one whose lock is held (a restore, backup or drill is running) is skipped and said so.
Never touched: kept previous copies (role `previous`, `<db>__pre_restore_*`), even marked ones, and an
operator's own ALLOW_CONNECTIONS false (only marked databases are re-enabled).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from worker.coordination.locks import (
    REPAIR_OWNER_PREFIX,
    DatabaseLock,
    database_lock,
    is_repair,
    kept_alive,
    renewal_interval,
)
from worker.errors import BackupError, LockHeld, first_line
from worker.pg.database import connect
from worker.pg.executors import Executor, choose_executor
from worker.pg.identity import server_identity
from worker.restore import pending, swap
from worker.settings import Settings
from worker.uploads import swap as uploads_swap

LockFactory = Callable[[str], DatabaseLock]
log = logging.getLogger(__name__)

_MARKED = (
    "SELECT d.datname FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
    " WHERE s.setrole = 0 AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c WHERE split_part(c, '=', 1) = %s)"
)


def is_kept_copy(admin: psycopg.Connection[Any], database: str) -> bool:
    found = swap.parse_comment(swap.database_comment(admin, database))
    return found is not None and found[0] == swap.KEPT


def refusing_connections(admin: psycopg.Connection[Any], database: str) -> bool:
    """Whether `database` is left marked by an interrupted swap and refusing connections (not a kept
    copy, not an operator's own unmarked ALLOW_CONNECTIONS false)."""
    shape = swap.shape_of(admin, database)
    return (shape is not None and not shape.allow_connections and swap.is_marked(admin, database)
            and not is_kept_copy(admin, database))


def find_broken(admin: psycopg.Connection[Any], database: str | None = None) -> list[str]:
    """Live databases (all, or only `database`) with something to repair: marked by a swap (kept copies
    excepted), or with scratch or drill databases of ours left behind. Sorted."""
    found: set[str] = set()
    for (name,) in admin.execute(_MARKED, (swap.SWAP_MARKER,)).fetchall():
        if not is_kept_copy(admin, name):
            found.add(name)
    for role in (swap.SCRATCH, swap.DRILL):
        found.update(leftover.live for leftover in swap.made_by_us(admin, role))
    return sorted(name for name in found if database is None or name == database)


def _discovery_connection(connect_kwargs: dict[str, Any]) -> psycopg.Connection[Any]:
    """A session on `postgres`, or on `template1` when `postgres` itself is the one refusing connections."""
    try:
        return connect(connect_kwargs, swap.MAINTENANCE_DB, autocommit=True)
    except BackupError as first:
        try:
            return connect(connect_kwargs, "template1", autocommit=True)
        except BackupError:
            raise first from None


def _repair_one(settings: Settings, connect_kwargs: dict[str, Any], live: str, lock: DatabaseLock) -> dict[str, Any]:
    """Under `live`'s lock (already held): drop its leftovers, re-enable it when a swap left it marked."""
    with kept_alive(lock, renewal_interval(settings)), swap.admin_connection(connect_kwargs, live) as admin:
        lock.confirm()  # right before each change: a repair that lost its lock changes nothing more
        dropped = swap.drop_leftover_scratches(admin, live)
        shape = swap.shape_of(admin, live)
        refused = shape is not None and not shape.allow_connections
        repaired = False
        if shape is not None and not is_kept_copy(admin, live):
            lock.confirm()
            repaired = swap.repair_refused_connections(admin, live)
        settled = _settle_uploads(settings, admin, live, lock)
        lock.confirm()
        tidied = pending.tidy_uploads(settings, admin, live)
    done: dict[str, Any] = {}
    if settled:
        done["uploads"] = settled
    if tidied:
        done["uploads_removed"] = tidied
    if dropped:
        done["dropped"] = dropped
    if repaired:
        done["reenabled" if refused else "cleared_mark"] = True
    return done


def _settle_uploads(settings: Settings, admin: psycopg.Connection[Any], live: str, lock: DatabaseLock) -> str | None:
    """An uploads swap of `live` a crash interrupted: finished or undone (`worker.restore.pending`)."""
    journal = _uploads_journal(settings)
    if journal is None or journal.database != live:
        return None
    lock.confirm()
    settled = pending.settle_uploads(settings, admin, live)
    return settled.message if settled is not None else None


def _uploads_leftovers(settings: Settings, admin: psycopg.Connection[Any], live: str) -> list[str]:
    try:
        return pending.uploads_leftovers(settings, admin, live)
    except OSError:  # an unreadable UPLOAD_DIR: the repair of its database says so
        return ["UPLOAD_DIR"]


def _failure_line(error: Exception) -> str:
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return first_line(error)


def _uploads_journal(settings: Settings) -> uploads_swap.Journal | None:
    if settings.UPLOAD_DIR is None:
        return None
    try:
        return uploads_swap.read_journal(settings.UPLOAD_DIR)
    except (BackupError, OSError):
        return None


def locks_for(settings: Settings, executor: Executor, owner: str) -> LockFactory:
    """Each database's lock, named as restores, backups and drills name theirs (the server's identity),
    owned by `owner`, the run repairing, marked as a repair (`REPAIR_OWNER_PREFIX`): a run that finds
    one of these locks held waits for the repair instead of refusing."""
    if not is_repair(owner):
        owner = REPAIR_OWNER_PREFIX + owner

    def lock_for(database: str) -> DatabaseLock:
        return database_lock(settings, database, owner, server_identity(settings, executor, database))

    return lock_for


def repair(settings: Settings, executor: Executor, database: str | None, lock_for: LockFactory) -> dict[str, Any]:
    """Repair `database` (or every database with something to repair) and report, JSON-able:

    `fixed`: {database: {"reenabled": True | "cleared_mark": True, "dropped": [names]}};
    `skipped`: {database: why} (its lock is held); `failed`: {database: error line};
    `left_broken`: the databases found broken and not repaired (skipped or failed), sorted;
    `removed_staging`: the staging folders of fetches that died, removed from BACKUP_DIR.

    Raises BackupError when the server cannot be reached at all."""
    connect_kwargs = executor.connect_kwargs()
    with _discovery_connection(connect_kwargs) as admin:
        candidates = find_broken(admin, database)
        journal = _uploads_journal(settings)
        uploads_owner = journal.database if journal is not None else settings.DB_NAME
        untidy = journal is not None or bool(_uploads_leftovers(settings, admin, uploads_owner))
    if untidy and uploads_owner not in candidates and database in (None, uploads_owner):
        candidates.append(uploads_owner)
    fixed: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for live in candidates:
        try:
            lock = lock_for(live)
            lock.acquire()
        except LockHeld as busy:
            skipped[live] = str(busy)
            continue
        except (BackupError, OSError) as error:  # Redis unreachable; a name no lock file can have
            failed[live] = f"cannot take its lock: {first_line(error)}"
            continue
        try:
            done = _repair_one(settings, connect_kwargs, live, lock)
        except Exception as error:  # one database's failure (an OSError in UPLOAD_DIR too) never stops the others
            failed[live] = _failure_line(error)
            log.debug("repair of %r failed", live, exc_info=True)
            continue
        finally:
            lock.release()
        if done:
            fixed[live] = done
    from worker.repository.fetch import remove_stale_staging

    staging = remove_stale_staging(settings, f"{REPAIR_OWNER_PREFIX}{uuid.uuid4()}")
    return {"fixed": fixed, "skipped": skipped, "failed": failed, "left_broken": sorted({*skipped, *failed}),
            "removed_staging": staging}


def left_refusing(settings: Settings, executor: Executor, database: str) -> bool:
    """Whether `database` is left refusing connections by an interrupted swap (for `tma-backup status`).
    Raises BackupError when the server cannot be reached or asked."""
    with swap.admin_connection(executor.connect_kwargs(), database) as admin:
        try:
            return refusing_connections(admin, database)
        except psycopg.Error as error:
            raise BackupError(
                f"cannot ask the server whether {database!r} accepts connections: {first_line(error)}") from None


def repair_at_start(settings: Settings, owner: str, retries: int = 2,
                    pause: float | None = None) -> dict[str, Any] | None:
    """The repair a worker runs by itself when it starts (in a thread of its own: it never delays the
    start). A database whose lock is still held, typically by the run whose crash is being repaired
    until its lease runs out, is tried again after BACKUP_LOCK_TIMEOUT, `retries` times. Anything that
    goes wrong (the server unreachable, Redis down) is one warning in the worker's log, never a crash."""
    try:
        executor = choose_executor(settings)
        lock_for = locks_for(settings, executor, owner)
        report = repair(settings, executor, None, lock_for)
        for _ in range(retries):
            if not report["skipped"]:
                break
            time.sleep(settings.BACKUP_LOCK_TIMEOUT + 1 if pause is None else pause)
            for name in list(report["skipped"]):
                again = repair(settings, executor, name, lock_for)
                report["fixed"].update(again["fixed"])
                report["failed"].update(again["failed"])
                if name in again["skipped"]:
                    report["skipped"][name] = again["skipped"][name]
                else:
                    del report["skipped"][name]
        report["left_broken"] = sorted({*report["skipped"], *report["failed"]})
    except Exception as error:  # never let start-up repair take the worker down
        log.warning("repair at worker start-up did not run: %s (the scheduled repair tries again)", first_line(error))
        return None
    describe(report, log.warning, log.info)
    return report


def describe(report: dict[str, Any], warn: Callable[[str], None], info: Callable[[str], None]) -> None:
    """One log line per database repaired, skipped or failed; one line when there was nothing to do."""
    for name, done in report.get("fixed", {}).items():
        warn(f"repaired {name!r}: {summary(done)}")
    for name, why in report.get("skipped", {}).items():
        warn(f"repair skipped {name!r}: {why}")
    for name, error in report.get("failed", {}).items():
        warn(f"repair of {name!r} failed: {error}")
    if not any(report.get(key) for key in ("fixed", "skipped", "failed")):
        info("repair: nothing left behind by an interrupted restore or drill")


def summary(done: dict[str, Any]) -> str:
    parts = []
    if done.get("reenabled"):
        parts.append("connections re-enabled (an interrupted swap had left it refusing them) and its mark cleared")
    if done.get("cleared_mark"):
        parts.append("a stale swap mark cleared (it was accepting connections)")
    if done.get("dropped"):
        parts.append(f"dropped leftover scratch databases {', '.join(done['dropped'])}")
    if done.get("uploads"):
        parts.append(f"uploads: {done['uploads']}")
    if done.get("uploads_removed"):
        parts.append(f"removed from UPLOAD_DIR what nothing needs any more: {', '.join(done['uploads_removed'])}")
    return "; ".join(parts)
