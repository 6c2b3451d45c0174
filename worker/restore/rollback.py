"""Rollback: swap the newest kept previous copy back in; the database it replaces is kept in its turn."""

from __future__ import annotations

from typing import Any

from worker.archive import catalogue
from worker.coordination.locks import DatabaseLock
from worker.errors import BackupError
from worker.pg.executors import Executor
from worker.restore import swap
from worker.settings import Settings


def rollback(settings: Settings, executor: Executor, live: str, confirm: str, lock: DatabaseLock, run: str) -> dict[str, Any]:
    """Swap the newest kept previous copy back in; the database it replaces is kept in its turn."""
    if confirm != live:
        raise BackupError(f"rollback refused: the confirmation {confirm!r} does not match the database {live!r}")
    lock.acquire()
    try:
        with swap.admin_connection(executor.connect_kwargs(), live) as admin:
            kept = swap.managed(admin, live, swap.KEPT)
            if not kept:
                raise BackupError(f"no kept previous copy of {live!r} to roll back to")
            previous = kept[-1].name
            swap.set_allow_connections(admin, previous, True)
            replaced = swap.kept_name(live, catalogue.utc_timestamp(), "pre_rollback")
            try:
                swap.swap_in(admin, live, previous, replaced, run)
            except BaseException:
                swap.set_allow_connections(admin, previous, False)
                raise
    finally:
        lock.release()
    return {"database": live, "restored_from": previous, "kept": replaced}
