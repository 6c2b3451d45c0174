"""UPLOAD_DIR as the database's side sees it: did an interrupted uploads swap's database swap commit,
and which set-aside files still belong to a kept database copy?

`worker.uploads.swap` keeps the journal and moves the files; this module answers what the journal
cannot: a swap committed when a copy kept by that run exists, or, when there was no live database to
keep (a fresh server), when the run's scratch database is gone and the live one exists. Callers hold
the database's lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from worker.restore import swap
from worker.settings import Settings
from worker.uploads import swap as uploads_swap


def database_swapped(admin: psycopg.Connection[Any], journal: uploads_swap.Journal) -> bool:
    if any(kept.run == journal.run for kept in swap.managed(admin, journal.database, swap.KEPT)):
        return True
    if journal.kept is None and journal.scratch:
        return swap.shape_of(admin, journal.scratch) is None and swap.shape_of(admin, journal.database) is not None
    return False


def settle_uploads(settings: Settings, admin: psycopg.Connection[Any], live: str) -> uploads_swap.Settled | None:
    """Finish or undo `live`'s interrupted uploads swap (None when there is none)."""
    if settings.UPLOAD_DIR is None:
        return None
    journal = uploads_swap.read_journal(settings.UPLOAD_DIR)
    if journal is None or journal.database != live:
        return None
    return uploads_swap.settle(settings.UPLOAD_DIR, lambda pending: database_swapped(admin, pending))


def _kept_copies(settings: Settings, admin: psycopg.Connection[Any], live: str) -> tuple[Path, set[str]] | None:
    """UPLOAD_DIR and the kept copies of `live` that exist; None when UPLOAD_DIR is not `live`'s (it is
    DB_NAME's) or not there."""
    folder = settings.UPLOAD_DIR
    if folder is None or live != settings.DB_NAME or not folder.is_dir():
        return None
    return folder, {database.name for database in swap.managed(admin, live, swap.KEPT)}


def uploads_leftovers(settings: Settings, admin: psycopg.Connection[Any], live: str) -> list[str]:
    """What the tool left in UPLOAD_DIR that nothing needs any more (`worker.uploads.swap.leftovers`)."""
    found = _kept_copies(settings, admin, live)
    return [] if found is None else uploads_swap.leftovers(*found, settings.RESTORE_KEEP_PREVIOUS)


def tidy_uploads(settings: Settings, admin: psycopg.Connection[Any], live: str) -> list[str]:
    """Remove `uploads_leftovers()`; returns what was removed."""
    found = _kept_copies(settings, admin, live)
    return [] if found is None else uploads_swap.tidy(*found, settings.RESTORE_KEEP_PREVIOUS)
