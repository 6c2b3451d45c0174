"""Where a database's last drill is recorded (`.<database>.last-drill.json` in BACKUP_DIR), and reading it:
apart from `drills`, so that `status` reads the record without importing the restore machinery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.settings import Settings


def record_path(settings: Settings, database: str) -> Path:
    return settings.backup_dir / f".{database}.last-drill.json"


def last_drill(settings: Settings, database: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(record_path(settings, database).read_text()))
    except (OSError, ValueError):
        return None
