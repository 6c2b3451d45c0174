"""Restore, rollback, drill and repair as Celery tasks: thin wrappers over `worker.restore`.

`tma_backup.restore` is never retried and never redelivered: `acks_late` is off (the message is
acknowledged before the task starts), and it has no retry policy. A restore that died half way is
finished or cleaned up by the next restore, drill or repair, never by running the same message again.
`tma_backup.repair` runs every few minutes (beat), and every worker runs the same repair by itself when
it starts (`worker.celery_app`).
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from tasks.reporting import progress_reporter
from worker import app, notify
from worker.coordination.locks import database_lock, redis_client
from worker.errors import BackupError
from worker.pg.executors import choose_executor
from worker.pg.identity import server_identity
from worker.restore import drills, prepare, repair, restore, rollback
from worker.restore.tokens import RedisTokenStore
from worker.settings import get_settings

logger = get_task_logger(__name__)


def _store() -> RedisTokenStore:
    settings = get_settings()
    return RedisTokenStore(redis_client(settings.broker_url or app.conf.broker_url))


@app.task(name="tma_backup.restore_prepare")
def prepare_restore(file: str, token_hash: str, checksum: bool = True) -> dict[str, Any]:
    """Check the backup where it lives (no database touched) and bind the token to it."""
    settings = get_settings()
    executor = choose_executor(settings)
    prepared = prepare.prepare(settings, executor, file, checksum)
    prepare.issue_token(_store(), prepared, settings.WORKER_HOST, settings.RESTORE_TOKEN_TTL, token_hash)
    return {**prepared.describe(), "host": settings.WORKER_HOST, "server": executor.describe(),
            "expires_in": settings.RESTORE_TOKEN_TTL}


@app.task(name="tma_backup.restore", bind=True, acks_late=False, max_retries=0)
def run_restore(self: Task, token: str, confirm: str, mode: str = "swap", file: str | None = None,
                uploads: str = "none") -> dict[str, Any]:
    settings = get_settings()
    executor = choose_executor(settings)
    lock = database_lock(settings, confirm, self.request.id, server_identity(settings, executor, confirm))
    result = restore.restore(settings, executor, _store(), token, confirm, lock, self.request.id, mode,
                             progress_reporter(self, with_fields=False), file, uploads)
    logger.info("restored %r from %s (kept %s)", result["database"], result["file"], result["kept"])
    return result


@app.task(name="tma_backup.rollback_prepare")
def prepare_rollback(database: str, token_hash: str) -> dict[str, Any]:
    """Name the kept copy a rollback of `database` would bring back, and bind the token to it."""
    settings = get_settings()
    return rollback.prepare_rollback(settings, choose_executor(settings), _store(), database, token_hash)


@app.task(name="tma_backup.rollback", bind=True, acks_late=False, max_retries=0)
def run_rollback(self: Task, token: str, confirm: str) -> dict[str, Any]:
    settings = get_settings()
    executor = choose_executor(settings)
    lock = database_lock(settings, confirm, self.request.id, server_identity(settings, executor, confirm))
    return rollback.rollback(settings, executor, _store(), token, confirm, lock, self.request.id)


@app.task(name="tma_backup.drill", bind=True, acks_late=False, max_retries=0)
def run_drill(self: Task, database: str | None = None, file: str | None = None, scheduled: bool = False,
              from_repository: str | None = None) -> dict[str, Any]:
    """Drill FILE under the database its .meta names (`database`, when given, must agree), or the newest
    complete backup of `database` (default DB_NAME); or set `from_repository` (`latest` or an id) of
    the repository. The scheduled drill uses the repository's latest set with BACKUP_DRILL_FROM_REPOSITORY."""
    settings = get_settings()
    if scheduled and settings.BACKUP_DRILL_FROM_REPOSITORY and settings.repository and file is None:
        from_repository = from_repository or "latest"
    return drills.run_and_record(settings, choose_executor(settings), database, file, self.request.id,
                                 progress_reporter(self, with_fields=False), scheduled=scheduled,
                                 from_repository=from_repository)


@app.task(name="tma_backup.repair", bind=True, acks_late=False, max_retries=0)
def run_repair(self: Task, database: str | None = None, scheduled: bool = False) -> dict[str, Any]:
    """Repair what interrupted restores and drills left (`worker.restore.repair`): of `database`, or
    of every database on the server. Beat runs it every few minutes (`scheduled`): a server that cannot
    be reached then is one warning, not a failed task."""
    settings = get_settings()
    try:
        executor = choose_executor(settings)
        report = repair.repair(settings, executor, database, repair.locks_for(settings, executor, self.request.id))
    except BackupError as error:
        if not scheduled:
            raise
        logger.warning("scheduled repair did not run: %s", error)
        return {"fixed": {}, "skipped": {}, "failed": {}, "left_broken": [], "unreachable": str(error)}
    repair.describe(report, logger.warning, logger.info)
    notify.left_refusing(settings, report["failed"], self.request.id,  # one message per database a day at most
                         still_refusing=lambda name: repair.left_refusing(settings, executor, name))
    return report
