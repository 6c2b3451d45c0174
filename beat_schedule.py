"""The beat schedule, and only that: the nightly backup at BACKUP_SCHEDULE (cron, UTC).

Every entry carries `expires`, so a backlog (beat down, workers busy) never runs a slot twice.
"""

from __future__ import annotations

from typing import Any

from worker.schedule import parse_cron
from worker.settings import Settings

NIGHTLY_BACKUP = "nightly-backup"


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        NIGHTLY_BACKUP: {
            "task": "tma_backup.backup",
            "schedule": parse_cron(settings.BACKUP_SCHEDULE),
            "kwargs": {"scheduled": True},
            "options": {"expires": 3600},
        },
    }
