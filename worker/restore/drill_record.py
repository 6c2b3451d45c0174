"""A database's last drill, recorded in `.<database>.last-drill.json` in BACKUP_DIR: written by `drills`, read
by `status`, which must not import the restore machinery to read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.archive.meta import write_atomically
from worker.settings import Settings


def record_path(settings: Settings, database: str) -> Path:
    return settings.backup_dir / f".{database}.last-drill.json"


def last_drill(settings: Settings, database: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(record_path(settings, database).read_text()))
    except (OSError, ValueError):
        return None


def record_drill(settings: Settings, database: str, outcome: dict[str, Any]) -> None:
    try:
        write_atomically(record_path(settings, database), json.dumps(outcome))
    except OSError:
        pass  # the drill's own outcome is what matters; status will say "no drill recorded"
