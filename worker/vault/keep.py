"""The vault's own upkeep, run only there (VAULT_MAINTENANCE_SCHEDULE): retention by time alone, then
`restic prune` and a check reading REPOSITORY_CHECK_SUBSET of the data.

Time-based rules only (`--keep-within`, `--keep-within-daily/weekly/monthly`), per server and database,
as restic documents for a copy a client cannot be trusted with: a count rule (`--keep-last`,
`--keep-daily 7`) lets sets with false dates take the place of real ones, a time rule cannot. Sets made
before sets named their server are never forgotten here (whose they are is unknown)."""

from __future__ import annotations

import time
from typing import Any

from worker.errors import BackupError
from worker.progress import Progress, no_progress
from worker.repository.access import vault_access
from worker.repository.lock import using_repository
from worker.repository.maintenance import forget
from worker.repository.restic import Restic
from worker.settings import Settings
from worker.vault.pull import own_folder, parts_of


def keep_arguments(settings: Settings) -> list[str]:
    rules = {"--keep-within": settings.VAULT_KEEP_WITHIN, "--keep-within-daily": settings.VAULT_KEEP_WITHIN_DAILY,
             "--keep-within-weekly": settings.VAULT_KEEP_WITHIN_WEEKLY,
             "--keep-within-monthly": settings.VAULT_KEEP_WITHIN_MONTHLY}
    return [part for flag, duration in rules.items() if duration for part in (flag, duration)]


def maintain(settings: Settings, owner: str, progress: Progress = no_progress) -> dict[str, Any]:
    """Forget per the vault's time rules, prune, check. `forgotten`: {database: short ids}."""
    if settings.vault is None:
        raise BackupError("VAULT_REPOSITORY is not set: this host is no vault")
    vault = Restic(settings, vault_access(settings))
    started = time.monotonic()
    own_folder(settings)
    with using_repository(settings, owner, progress, address=settings.vault):
        vault.run(["unlock"])
        groups = sorted({(part.database, part.server) for part in parts_of(vault) if part.server is not None})
        forgotten: dict[str, list[str]] = {}
        for database, server in groups:
            retention = forget(vault, settings, database, server, keep_arguments(settings))
            forgotten.setdefault(database, []).extend(retention.forgotten)
        progress("pruning the vault", {})
        vault.run(["prune"])
        progress("checking the vault", {"subset": settings.REPOSITORY_CHECK_SUBSET})
        vault.run(["check", "--read-data-subset", settings.REPOSITORY_CHECK_SUBSET])
    return {"vault": vault.shown, "forgotten": forgotten, "seconds": round(time.monotonic() - started, 3)}
