"""The repository's tasks: fetch a set onto a worker's host (for a restore or drill from the repository)
and the weekly upkeep (prune and a partial check). Thin wrappers over `worker.repository`."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from tasks.reporting import progress_reporter
from worker import app, notify
from worker.repository import fetch as fetching
from worker.repository import maintenance
from worker.settings import get_settings

logger = get_task_logger(__name__)


@app.task(name="tma_backup.fetch", bind=True, acks_late=False, max_retries=0)
def fetch(self: Task, reference: str, database: str | None = None, server: str | None = None,
          whole: bool = False) -> dict[str, Any]:
    """Fetch set `reference` (`latest` of `database` made by `server`, default this one's; or an id) into
    this host's BACKUP_DIR, checked. `whole`: `latest` is the newest set with its uploads part."""
    return fetching.fetch(get_settings(), reference, database, self.request.id, progress_reporter(self), server,
                          whole)


@app.task(name="tma_backup.repository_maintenance", bind=True, acks_late=False, max_retries=0)
def repository_maintenance(self: Task, scheduled: bool = False) -> dict[str, Any]:
    """Retention for every database and `restic prune`, then `restic check` reading
    REPOSITORY_CHECK_SUBSET of the data. Beat runs it weekly (REPOSITORY_MAINTENANCE_SCHEDULE)."""
    settings = get_settings()
    if not settings.repository:
        return {"skipped": "BACKUP_REPOSITORY is not set"}
    progress = progress_reporter(self)
    operation = "prune"
    try:
        pruned = maintenance.prune(settings, self.request.id, progress)
        operation = "check"
        checked = maintenance.check(settings, self.request.id, settings.REPOSITORY_CHECK_SUBSET, progress)
    except Exception as error:
        notify.repository_failed(settings, operation, error, self.request.id)
        raise
    logger.info("repository %s pruned in %.1f s and checked (%s of the data read) in %.1f s", pruned["repository"],
                pruned["prune_seconds"], checked["subset"], checked["seconds"])
    return {"prune": pruned, "check": checked}
