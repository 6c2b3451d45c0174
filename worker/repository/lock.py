"""One lock per repository, held by whatever uses it (a run's offsite link, a fetch, forget, prune,
check): restic's own `forget`, `prune`, `tag` and `check` need its exclusive lock, and restic 0.14
fails at once, without waiting, when another process holds one. Taking ours first means restic never
meets a live lock, so a restic lock found while ours is held is a killed run's: `restic unlock`
removes it (it removes only stale ones).

It is the database lock's machinery (`worker.coordination.locks`: a Redis lease renewed while the
work runs, freed within seconds when a worker dies) under a key named by the repository's address.
A second user waits for it, up to REPOSITORY_LOCK_WAIT seconds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

from worker.coordination.locks import DatabaseLock, database_lock, kept_alive, renewal_interval
from worker.errors import LockHeld
from worker.progress import Progress, no_progress
from worker.repository.restic import RepositoryError, redacted
from worker.settings import Settings

POLL_SECONDS = 1.0


def repository_lock(settings: Settings, owner: str, address: str | None = None) -> DatabaseLock:
    """The lock of the repository at `address` (default: BACKUP_REPOSITORY; a vault's own is VAULT_REPOSITORY)."""
    digest = hashlib.sha256((address if address is not None else settings.repository or "").encode()).hexdigest()[:16]
    return database_lock(settings, f"repository-{digest}", owner, server="restic-repository")


@contextmanager
def using_repository(settings: Settings, owner: str, progress: Progress = no_progress,
                     wait: float | None = None, address: str | None = None) -> Iterator[DatabaseLock]:
    """Hold the lock of the repository at `address` (default: BACKUP_REPOSITORY) while the block runs
    (renewed in the background), waiting up to `wait` seconds (REPOSITORY_LOCK_WAIT) for another user."""
    lock = repository_lock(settings, owner, address)
    deadline = time.monotonic() + (settings.REPOSITORY_LOCK_WAIT if wait is None else wait)
    announced = False
    while True:
        try:
            lock.acquire()
            break
        except LockHeld:
            if time.monotonic() >= deadline:
                raise RepositoryError(
                    f"the repository at {redacted(address or settings.repository or '')} stayed busy (run "
                    f"{lock.holder() or 'unknown'} uses it) for longer than REPOSITORY_LOCK_WAIT "
                    f"({settings.REPOSITORY_LOCK_WAIT} s)"
                ) from None
            if not announced:
                progress("waiting for the repository", {"holder": lock.holder() or "unknown"})
                announced = True
            time.sleep(POLL_SECONDS)
    try:
        with kept_alive(lock, renewal_interval(settings)) as lost:
            yield lock
            if lost.is_set():
                lock.confirm()
    finally:
        lock.release()
