"""The beat schedule, and only that: the nightly backup at BACKUP_SCHEDULE, the weekly restore
drill at BACKUP_DRILL_SCHEDULE (cron, UTC), the repair of what interrupted restores left
(a database refusing connections, scratch databases) every REPAIR_INTERVAL, and with a repository its
weekly prune and check at REPOSITORY_MAINTENANCE_SCHEDULE. A vault's beat runs its pull and its upkeep only.

Every entry carries `expires`, so a backlog (beat down, workers busy) never runs a slot twice.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from worker.coordination.schedule import celery_crontab
from worker.settings import Settings

NIGHTLY_BACKUP = "nightly-backup"
WEEKLY_DRILL = "weekly-restore-drill"
REPAIR = "repair-interrupted-restores"
REPOSITORY_MAINTENANCE = "repository-maintenance"
VAULT_PULL = "vault-pull"
VAULT_MAINTENANCE = "vault-maintenance"
REPAIR_INTERVAL = timedelta(minutes=5)


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    if settings.vault is not None:
        return vault_schedule(settings)
    schedule = {
        NIGHTLY_BACKUP: {
            "task": "tma_backup.backup",
            "schedule": celery_crontab(settings.BACKUP_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        },
        WEEKLY_DRILL: {
            "task": "tma_backup.drill",
            "schedule": celery_crontab(settings.BACKUP_DRILL_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        },
        REPAIR: {
            "task": "tma_backup.repair",
            "schedule": REPAIR_INTERVAL,
            "kwargs": {"scheduled": True},
            # a copy that waited longer than this is superseded by the next one
            "options": {"expires": int(REPAIR_INTERVAL.total_seconds()) - 60},
        },
    }
    if settings.repository:
        # `restic prune` reads every index and rewrites partly used packs: weekly, apart from the
        # nightly backups (which forget per REPOSITORY_KEEP_* themselves), and under the repository's lock.
        schedule[REPOSITORY_MAINTENANCE] = {
            "task": "tma_backup.repository_maintenance",
            "schedule": celery_crontab(settings.REPOSITORY_MAINTENANCE_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        }
    return schedule


def vault_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """A vault's beat (VAULT_REPOSITORY set): its pull and its own upkeep, nothing else (no database)."""
    return {
        VAULT_PULL: {
            "task": "tma_backup.vault_pull",
            "schedule": celery_crontab(settings.VAULT_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3000},  # a pull that waited this long is superseded by the next one
        },
        VAULT_MAINTENANCE: {
            "task": "tma_backup.vault_maintenance",
            "schedule": celery_crontab(settings.VAULT_MAINTENANCE_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        },
    }
