"""Rollback: swap the newest kept previous copy back in; the database it replaces is kept in its turn.

Guarded like a restore: `prepare_rollback` names the copy that would come back and binds a single-use,
expiring token to (database, that copy); `rollback` consumes the token first and swaps exactly that
copy in, under the database's lock. A message on the broker without a valid token changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.coordination.locks import DatabaseLock, held, renewal_interval
from worker.errors import BackupError
from worker.pg.executors import Executor
from worker.restore import pending, swap
from worker.restore.tokens import TokenBinding, TokenRefused, TokenStore, consume
from worker.settings import Settings
from worker.uploads import swap as uploads_swap

ACTION = "rollback"


def newest_kept(executor: Executor, live: str) -> str:
    """The kept previous copy a rollback of `live` would bring back (the newest)."""
    with swap.admin_connection(executor.connect_kwargs(), live) as admin:
        kept = swap.managed(admin, live, swap.KEPT)
    if not kept:
        raise BackupError(f"no kept previous copy of {live!r} to roll back to")
    return kept[-1].name


def prepare_rollback(settings: Settings, executor: Executor, store: TokenStore, live: str, hashed: str) -> dict[str, Any]:
    """Bind the token whose hash is `hashed` to rolling `live` back to its newest kept copy."""
    kept = newest_kept(executor, live)
    store.put(hashed, TokenBinding(live, kept, "", settings.WORKER_HOST, ACTION), settings.RESTORE_TOKEN_TTL)
    return {"database": live, "kept": kept, "host": settings.WORKER_HOST, "expires_in": settings.RESTORE_TOKEN_TTL}


def rollback(settings: Settings, executor: Executor, store: TokenStore, token: str, confirm: str, lock: DatabaseLock,
             run: str) -> dict[str, Any]:
    """Consume the token, then swap the kept copy it names back in (if it is still this database's)."""
    binding = consume(store, token, confirm, ACTION)
    live, previous = binding.database, binding.file
    with held(lock, renewal_interval(settings)), swap.admin_connection(executor.connect_kwargs(), live) as admin:
        pending.settle_uploads(settings, admin, live)  # a restore's swap a crash interrupted: settled first
        if previous not in {kept.name for kept in swap.managed(admin, live, swap.KEPT)}:
            raise TokenRefused(f"rollback refused: {previous!r}, the copy the token was issued for, is no longer "
                               f"a kept copy of {live!r}; prepare the rollback again")
        lock.confirm()  # right before the swap: a rollback that lost its lock changes nothing
        swap.set_allow_connections(admin, previous, True)
        replaced = swap.free_kept_name(admin, live, catalogue.utc_timestamp(), "pre_rollback")

        def swap_database() -> None:
            try:
                swap.swap_in(admin, live, previous, replaced, run)
            except BaseException:
                swap.set_allow_connections(admin, previous, False)
                raise

        paired = _paired_uploads(settings, previous)
        if paired is not None and settings.UPLOAD_DIR is not None:
            # The files that were live when `previous` was: swapped back with it, the current ones kept aside.
            _, swapped = uploads_swap.swap_uploads(settings.UPLOAD_DIR, paired, run, live, replaced, swap_database)
            return {"database": live, "restored_from": previous, "kept": replaced,
                    "uploads": {"restored_from": paired.name, "kept": swapped.previous, "left_in_place": swapped.left}}
        swap_database()
    return {"database": live, "restored_from": previous, "kept": replaced}


def _paired_uploads(settings: Settings, kept_database: str) -> Path | None:
    """The uploads folder a restore set aside together with the database copy `kept_database`."""
    if settings.UPLOAD_DIR is None:
        return None
    folder = settings.UPLOAD_DIR / f"{uploads_swap.PREVIOUS_PREFIX}{kept_database}"
    return folder if folder.is_dir() and not folder.is_symlink() else None
