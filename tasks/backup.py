"""The backup chain as Celery tasks: thin wrappers over `worker.backup`.

`tma_backup.backup` takes the database's lock, then starts dump → verify → checksum → meta → offsite
(with BACKUP_REPOSITORY) → prune,
every link routed to the queue of its own host so that the chain runs where its files are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from celery import Task, chain
from celery.utils.log import get_task_logger

from tasks.reporting import progress_reporter
from worker import app, notify
from worker.backup import links as backup
from worker.backup.run import Run
from worker.backup.unchanged import release_if_unchanged
from worker.celery_app import host_queue
from worker.coordination import parking
from worker.coordination.locks import database_lock
from worker.coordination.slots import claim_slot
from worker.errors import BackupError, LockHeld
from worker.pg.executors import choose_executor
from worker.pg.identity import server_identity
from worker.pg.server_errors import ServerUnavailable
from worker.settings import get_settings

logger = get_task_logger(__name__)

# A dump that lost its database server (restart, failover) is retried BACKUP_RETRIES times, after 3 s,
# 6 s, 12 s ... (at most 30 s; no jitter: one dump per database, no herd to spread). The run keeps its
# lock across the wait, and the dump removed its partial files before raising.
RETRY_BACKOFF = 3
RETRY_BACKOFF_MAX = 30


class DumpTask(Task):
    """The dump link's task class: its retry limit is the BACKUP_RETRIES setting, read when a retry is
    decided (in the worker, with the worker's settings), not when this module is imported."""

    @property
    def max_retries(self) -> int:
        return get_settings().BACKUP_RETRIES


def _lock(run: Run) -> Any:
    return database_lock(get_settings(), run["database"], run["run_id"], run.get("server"))


@contextmanager
def _link(run: Run, hands_over: bool = True) -> Iterator[Any]:
    """The run's lock for one link: taken back from the host's parking as the link starts, parked again
    when the link hands over to the next one (`worker.coordination.parking`). A failed link is not
    parked: the chain's error callback releases its lock."""
    settings = get_settings()
    backup.check_run(run, settings)  # before anything: the record came in a message
    lock = _lock(run)
    parking.unpark(settings, lock)
    yield lock
    if hands_over:
        parking.park(settings, lock)


@app.task(name="tma_backup.backup", bind=True)
def start_backup(self: Task, database: str | None = None, scheduled: bool = False,
                 if_changed: bool = False) -> dict[str, Any]:
    """A scheduled run (and one asked `if_changed`) makes no set when nothing changed since the last one."""
    settings = get_settings()
    database = database or settings.DB_NAME
    run_id = self.request.id
    executor = choose_executor(settings)
    server = server_identity(settings, executor, database)
    lock = database_lock(settings, database, run_id, server)
    try:
        run = backup.start_run(settings, database, run_id, lock, server)
    except LockHeld as busy:
        if scheduled:
            logger.warning("scheduled backup skipped: %s", busy)
            notify.backup_skipped(settings, database, str(busy), run_id)
            return {"skipped": str(busy), "database": database}
        raise
    except Exception as error:  # BACKUP_DIR unusable, a bad name: the run failed before its first link
        notify.backup_failed(settings, database, run_id, error, "start")
        raise
    if scheduled:
        try:
            taken = claim_slot(settings, server, database, run_id)
        except BaseException:
            lock.release()
            raise
        if taken:
            lock.release()
            logger.warning("scheduled backup skipped: %s", taken)
            return {"skipped": taken, "database": database}
    if scheduled or if_changed:
        unchanged = release_if_unchanged(settings, executor, database, server, lock)
        if unchanged is not None:
            logger.info("nothing changed in %r since the set of %s: no set made", database, unchanged["timestamp"])
            notify.backup_unchanged(settings, database, unchanged, run_id)
            return {"unchanged": unchanged, "database": database}
    for warning in run["warnings"]:
        logger.warning("%s", warning)
    notify.backup_started(settings, database, run_id)  # before any link: `start` precedes `fail` or success
    queue = host_queue(settings.WORKER_HOST)
    signatures = [
        dump.s(run).set(queue=queue),
        verify.s().set(queue=queue),
        checksum.s().set(queue=queue),
        write_meta.s().set(queue=queue),
        *([offsite.s().set(queue=queue)] if settings.repository else []),
        prune.s().set(queue=queue),
    ]
    links = chain(*signatures)
    links.link_error(backup_failed.s().set(queue=queue))
    parking.park(settings, lock)  # before the first link can start and take it back
    result = links.apply_async()
    steps = []
    node = result
    while node is not None:
        steps.append(node.id)
        node = node.parent
    logger.info("backup %s of %r started on %s", run["backup"], database, settings.WORKER_HOST)
    return {
        "run_id": run_id,
        "database": database,
        "backup": run["backup"],
        "host": run["host"],
        "steps": steps[::-1],
        "step_names": [signature.name.removeprefix("tma_backup.") for signature in signatures],
        "lock": getattr(lock, "key", None),  # the follower watches it: a dead worker's run loses it
        "warnings": run["warnings"],
    }


@app.task(
    name="tma_backup.dump",
    bind=True,
    base=DumpTask,
    autoretry_for=(ServerUnavailable,),
    retry_backoff=RETRY_BACKOFF,
    retry_backoff_max=RETRY_BACKOFF_MAX,
    retry_jitter=False,
)
def dump(self: Task, run: Run) -> Run:
    settings = get_settings()
    with _link(run) as lock:
        try:
            return backup.dump(run, settings, choose_executor(settings), lock, progress_reporter(self))
        except ServerUnavailable:
            lock.hold(settings.BACKUP_LOCK_TIMEOUT + RETRY_BACKOFF_MAX)  # still ours while it waits to retry
            raise


@app.task(name="tma_backup.verify", bind=True)
def verify(self: Task, run: Run) -> Run:
    settings = get_settings()
    with _link(run) as lock:
        return backup.verify(run, settings, choose_executor(settings), lock, progress_reporter(self))


@app.task(name="tma_backup.checksum", bind=True)
def checksum(self: Task, run: Run) -> Run:
    with _link(run) as lock:
        return backup.checksum(run, get_settings(), lock, progress_reporter(self))


@app.task(name="tma_backup.meta", bind=True)
def write_meta(self: Task, run: Run) -> Run:
    with _link(run) as lock:
        return backup.write_meta(run, get_settings(), lock, task_id=self.request.id)


@app.task(name="tma_backup.offsite", bind=True)
def offsite(self: Task, run: Run) -> Run:
    with _link(run) as lock:
        return backup.offsite(run, get_settings(), lock, progress_reporter(self))


@app.task(name="tma_backup.prune", bind=True)
def prune(self: Task, run: Run) -> backup.Summary:
    with _link(run, hands_over=False) as lock:
        result = backup.summary(backup.prune(run, get_settings(), lock, progress_reporter(self)))
    notify.backup_succeeded(get_settings(), result, run["run_id"])
    return result


@app.task(name="tma_backup.backup_failed")
def backup_failed(request: Any, exc: BaseException, traceback: Any) -> dict[str, Any]:
    """Error callback of the chain, run by the worker where the link failed: remove this run's partial
    files, release the lock if this run still owns it, record one clear line."""
    given = request.args[0] if request.args else None
    if not isinstance(given, dict) or "backup" not in given:
        logger.error("backup link %s failed: %s", request.id, exc)
        return {"error": str(exc)}
    run = cast(Run, given)
    try:
        backup.check_run(run, get_settings())
    except BackupError as refused:
        logger.error("backup link %s failed: %s; its error callback %s", request.id, exc, refused)
        return {"error": str(exc), "refused": str(refused)}
    lock = _lock(run)
    holder = lock.holder()
    if holder not in (None, run["run_id"]):  # another run holds the database now: its files are not ours to touch
        logger.error("backup of %r failed: %s (its lock is another run's now; removed nothing)", run["database"], exc)
        return {"database": run["database"], "error": str(exc), "removed": []}
    try:
        removed = backup.abandon_files(run)
    finally:
        with _link(run, hands_over=False) as lock:
            lock.release()
    logger.error("backup of %r failed: %s (removed %s)", run["database"], exc, removed or "nothing")
    link = str(getattr(request, "task", None) or "").removeprefix("tma_backup.") or None
    notify.backup_failed(get_settings(), run["database"], run["run_id"], exc, link)
    return {"database": run["database"], "error": str(exc), "removed": removed}
