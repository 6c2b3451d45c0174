"""The beat schedule, and only that: the nightly backup at BACKUP_SCHEDULE, the weekly restore
drill at BACKUP_DRILL_SCHEDULE (cron, UTC), and the repair of what interrupted restores left
(a database refusing connections, scratch databases) every REPAIR_INTERVAL.

Every entry carries `expires`, so a backlog (beat down, workers busy) never runs a slot twice.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from worker.coordination.schedule import parse_cron
from worker.settings import Settings

NIGHTLY_BACKUP = "nightly-backup"
WEEKLY_DRILL = "weekly-restore-drill"
REPAIR = "repair-interrupted-restores"
REPAIR_INTERVAL = timedelta(minutes=5)


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        NIGHTLY_BACKUP: {
            "task": "tma_backup.backup",
            "schedule": parse_cron(settings.BACKUP_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        },
        WEEKLY_DRILL: {
            "task": "tma_backup.drill",
            "schedule": parse_cron(settings.BACKUP_DRILL_SCHEDULE),
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
