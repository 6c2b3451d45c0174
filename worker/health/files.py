"""Backups listed and verified as plain data, on the host where they are (`tma-backup list`, `verify`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.settings import Settings


def listing(settings: Settings) -> dict[str, Any]:
    """Every backup in BACKUP_DIR, oldest first: `file`, `database`, `timestamp`, `size`, `toc_entries`
    (null without a readable .meta), `problem` (why it is not complete; null when it is)."""
    entries = catalogue.list_all_backups(settings.backup_dir)
    return {
        "host": settings.WORKER_HOST,
        "folder": str(settings.backup_dir),
        "backups": [{"file": entry.path.name, "database": entry.database, "timestamp": entry.timestamp,
                     "size": entry.size, "toc_entries": entry.meta.toc_entries if entry.meta else None,
                     "problem": entry.problem} for entry in entries],
    }


def _exists(path: Path) -> bool:
    """Whether anything is there; a name the file system refuses (too long, a loop) raises OSError."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def verify_here(settings: Settings, file: str) -> dict[str, Any]:
    """Verify FILE (a name in BACKUP_DIR or a path) against its .meta, here. `found` is false, and nothing
    is checked, when there is no such file on this host; a file that fails raises BackupError."""
    from worker.archive.verification import verify_backup
    from worker.pg.executors import choose_executor

    path = catalogue.locate(settings.backup_dir, file)
    answer: dict[str, Any] = {"host": settings.WORKER_HOST, "path": str(path), "found": _exists(path)}
    if not answer["found"]:
        return answer
    checked = verify_backup(path, settings, choose_executor(settings))
    return {**answer, "sha256": checked.meta.sha256, "toc_entries": checked.toc_entries,
            "tables": len(checked.meta.row_counts), "rows": sum(checked.meta.row_counts.values())}
