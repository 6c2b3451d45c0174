"""`tma-backup status | list | verify FILE` answered by a worker host for its own BACKUP_DIR, database
server and repository: thin wrappers over `worker.health`. The CLI sends each to the queue of the host
it asks (`worker.celery_app.host_queue`). Arguments and results hold names and facts, never a secret."""

from __future__ import annotations

from typing import Any

from worker import app
from worker.errors import BackupError
from worker.health.facts import status_facts
from worker.health.files import listing, verify_here
from worker.settings import check_database_name, get_settings


@app.task(name="tma_backup.status", acks_late=False, max_retries=0)
def status(database: str | None = None) -> dict[str, Any]:
    """The status facts of `database` (default: this worker's DB_NAME) on this host."""
    if database is not None:
        try:
            check_database_name(database)
        except ValueError as error:
            raise BackupError(f"database name {database!r} refused: {error}") from None
    return status_facts(get_settings(), database)


@app.task(name="tma_backup.list_backups", acks_late=False, max_retries=0)
def list_backups() -> dict[str, Any]:
    """Every backup in this host's BACKUP_DIR."""
    return listing(get_settings())


@app.task(name="tma_backup.verify_file", acks_late=False, max_retries=0)
def verify_file(file: str) -> dict[str, Any]:
    """Verify FILE against its .meta on this host; `found` is false when it is not here."""
    return verify_here(get_settings(), file)
