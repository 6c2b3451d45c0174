"""Restore, rollback and drill as Celery tasks: thin wrappers over `worker.restore`.

`tma_backup.restore` is never retried and never redelivered: `acks_late` is off (the message is
acknowledged before the task starts), and it has no retry policy. A restore that died half way is
finished or cleaned up by the next restore or drill, never by running the same message again.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from worker import app
from worker.coordination.locks import database_lock, redis_client
from worker.pg.executors import choose_executor
from worker.restore import drills, prepare, restore, rollback
from worker.restore.tokens import RedisTokenStore
from worker.settings import get_settings

logger = get_task_logger(__name__)


def _store() -> RedisTokenStore:
    settings = get_settings()
    return RedisTokenStore(redis_client(settings.broker_url or app.conf.broker_url))


def _progress(task: Task) -> Any:
    def report(phase: str, fields: dict[str, Any]) -> None:
        task.update_state(state="PROGRESS", meta={"phase": phase})
        task.send_event("task-progress", result=phase)

    return report


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
def run_restore(self: Task, token: str, confirm: str, mode: str = "swap", file: str | None = None) -> dict[str, Any]:
    settings = get_settings()
    executor = choose_executor(settings)
    lock = database_lock(settings, confirm, self.request.id)
    result = restore.restore(settings, executor, _store(), token, confirm, lock, self.request.id, mode,
                             _progress(self), file)
    logger.info("restored %r from %s (kept %s)", result["database"], result["file"], result["kept"])
    return result


@app.task(name="tma_backup.rollback", bind=True, acks_late=False, max_retries=0)
def run_rollback(self: Task, database: str, confirm: str) -> dict[str, Any]:
    settings = get_settings()
    lock = database_lock(settings, database, self.request.id)
    return rollback.rollback(settings, choose_executor(settings), database, confirm, lock, self.request.id)


@app.task(name="tma_backup.drill", bind=True, acks_late=False, max_retries=0)
def run_drill(self: Task, database: str | None = None, file: str | None = None, scheduled: bool = False) -> dict[str, Any]:
    settings = get_settings()
    database = database or settings.DB_NAME
    return drills.run_and_record(settings, choose_executor(settings), database, file, self.request.id,
                                 _progress(self), scheduled=scheduled)
