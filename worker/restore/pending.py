"""An uploads swap a crash interrupted, settled from the database's side: did its database swap commit?

`worker.uploads.swap` keeps the journal and moves the files; this module answers the one question the
journal cannot: a swap committed when a copy kept by that run exists, or, when there was no live
database to keep (a fresh server), when the run's scratch database is gone and the live one exists.
Callers hold the database's lock.
"""

from __future__ import annotations

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


def settle_uploads(settings: Settings, admin: psycopg.Connection[Any], live: str) -> str | None:
    """Finish or undo `live`'s interrupted uploads swap (None when there is none)."""
    if settings.UPLOAD_DIR is None:
        return None
    journal = uploads_swap.read_journal(settings.UPLOAD_DIR)
    if journal is None or journal.database != live:
        return None
    return uploads_swap.settle(settings.UPLOAD_DIR, lambda pending: database_swapped(admin, pending))
