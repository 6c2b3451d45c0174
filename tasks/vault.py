"""The vault's tasks (a host with VAULT_REPOSITORY): the hourly pull and the weekly upkeep. Thin wrappers
over `worker.vault`. On any other host they do nothing: the TMA side holds no vault secret, so no
message sent there can touch a vault."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from tasks.reporting import progress_reporter
from worker import app, notify
from worker.settings import get_settings
from worker.vault import keep, pull, watch

logger = get_task_logger(__name__)
NOT_A_VAULT = "VAULT_REPOSITORY is not set: this host is no vault"


@app.task(name="tma_backup.vault_pull", bind=True, acks_late=False, max_retries=0)
def vault_pull(self: Task, scheduled: bool = False) -> dict[str, Any]:
    """Copy the primary's sets the vault lacks; tell of what looks like a compromise."""
    settings = get_settings()
    if settings.vault is None:
        return {"skipped": NOT_A_VAULT}
    try:
        result = pull.pull(settings, self.request.id, progress_reporter(self))
    except Exception as error:
        notify.vault_failed(settings, "pull", error, self.request.id)
        raise
    for alarm in result["alarms"]:
        logger.error("vault alarm: %s", alarm)
    notify.vault_pulled(settings, result, watch.active(watch.State.load(settings)), self.request.id)
    return result


@app.task(name="tma_backup.vault_maintenance", bind=True, acks_late=False, max_retries=0)
def vault_maintenance(self: Task, scheduled: bool = False) -> dict[str, Any]:
    """The vault's time-based retention, prune and check (VAULT_MAINTENANCE_SCHEDULE)."""
    settings = get_settings()
    if settings.vault is None:
        return {"skipped": NOT_A_VAULT}
    try:
        return keep.maintain(settings, self.request.id, progress_reporter(self))
    except Exception as error:
        notify.vault_failed(settings, "upkeep", error, self.request.id)
        raise
