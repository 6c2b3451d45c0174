"""One lock per database: held by a backup chain from kickoff to prune, and by a whole restore.

The lock is named by the server's identity (its `system_identifier`, so `localhost`, `127.0.0.1` and a
container name are one server) and the database. It is a redis-py `Lock` whose owner token is the run
id: a short lease (BACKUP_LOCK_TIMEOUT, 9 s by default) renewed every third of it while a step runs, so
a killed worker frees it within seconds; only its owner releases it. Renewal rides out Redis errors
until the lease would have run out, and gives up only then or when the lock is gone or taken.

A repair (`worker.restore.repair`: at a worker's start, every few minutes from beat, or asked for)
holds a lock for the few seconds its clean-up takes; its owner starts with `repair-`. A run that finds
the lock held by a repair waits for it (up to REPAIR_WAIT_SECONDS) instead of refusing: an operator's
restore or drill must not fail because a worker was just restarted.

Without a broker (in-process runs) it is an `flock` on a file in BACKUP_DIR, which the kernel releases
when the process dies, plus the same Redis lock in the local Redis that a broker-less worker uses,
whenever that Redis answers: a CLI without a broker and the workers then see each other's locks.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from worker.errors import BackupError, LockHeld

if TYPE_CHECKING:
    from worker.settings import Settings

KEY_PREFIX = "tma_backup:lock"
UNREACHABLE_RETRY_SECONDS = 0.5
REPAIR_OWNER_PREFIX = "repair-"
REPAIR_WAIT_SECONDS = 60.0
REPAIR_POLL_SECONDS = 0.25


def is_repair(owner: str | None) -> bool:
    return owner is not None and owner.startswith(REPAIR_OWNER_PREFIX)


def busy(database: str, holder: str | None, on_this_host: bool = False) -> LockHeld:
    """The one line a run refused by a held lock shows, naming what holds it."""
    if is_repair(holder):
        what = "a repair"
    else:
        what = "another backup or restore" if on_this_host else "a backup or restore"
    where = " on this host" if on_this_host else ""
    return LockHeld(f"database {database!r} is busy: {what}{where} holds its lock (run {holder or 'unknown'}); "
                    "try again when it has finished")


def acquire_after_repairs(try_acquire: Callable[[], bool], holder: Callable[[], str | None],
                          refused: Callable[[str | None], LockHeld]) -> None:
    """Take a lock with `try_acquire`; while a repair holds it, wait for it (REPAIR_WAIT_SECONDS at
    most); anything else holding it is refused at once (`refused(holder)`)."""
    deadline = time.monotonic() + REPAIR_WAIT_SECONDS
    while not try_acquire():
        owner = holder()
        if not is_repair(owner) or time.monotonic() >= deadline:
            raise refused(owner)
        time.sleep(REPAIR_POLL_SECONDS)


class LockLost(BackupError):
    """The lock expired or another run took it: this run must stop before its next destructive step."""


class LockUnreachable(BackupError):
    """Redis did not answer; the lock may still be ours until its lease runs out."""


class DatabaseLock(Protocol):
    def acquire(self) -> None:
        """Take the lock (waiting for a repair that holds it: `acquire_after_repairs`) or raise LockHeld."""

    def confirm(self) -> None:
        """Prove we still own it (and refresh its expiry) or raise BackupError."""

    def release(self) -> None:
        """Release it if we own it; never someone else's."""

    def hold(self, seconds: float) -> None:
        """Keep it for at least `seconds` from now without anyone renewing it (a retry's wait); raises
        BackupError when we no longer own it."""

    def holder(self) -> str | None: ...

    @property
    def lease(self) -> float:
        """Seconds the lock stays ours after its last renewal, without anyone renewing it."""


def lock_key(server: str, database: str) -> str:
    return f"{KEY_PREFIX}:{server}:{database}"


class RedisDatabaseLock:
    def __init__(self, client: redis.Redis, server: str, database: str, owner: str, timeout: int) -> None:
        self.database = database
        self.owner = owner
        self.timeout = timeout
        self._key = lock_key(server, database)
        self._lock = client.lock(self._key, timeout=timeout, thread_local=False)
        self._client = client

    @property
    def key(self) -> str:
        """The Redis key; its value is the owner's run id while the lock is held."""
        return self._key

    @property
    def lease(self) -> float:
        return float(self.timeout)

    def acquire(self) -> None:
        acquire_after_repairs(self._try_acquire, self.holder, lambda holder: busy(self.database, holder))

    def _try_acquire(self) -> bool:
        try:
            return bool(self._lock.acquire(blocking=False, token=self.owner))
        except RedisError as error:
            raise BackupError(f"cannot reach Redis for the lock of {self.database!r}: {error}") from None

    def confirm(self) -> None:
        self._lock.local.token = self.owner.encode()
        try:
            self._lock.reacquire()
        except (LockNotOwnedError, LockError):
            raise LockLost(
                f"lost the lock of {self.database!r} (it expired or another run took it); stopping"
            ) from None
        except RedisError as error:
            raise LockUnreachable(f"cannot reach Redis to renew the lock of {self.database!r}: {error}") from None

    def hold(self, seconds: float) -> None:
        self._lock.local.token = self.owner.encode()
        try:
            self._lock.extend(max(seconds, self.timeout), replace_ttl=True)
        except (LockNotOwnedError, LockError):
            raise LockLost(f"lost the lock of {self.database!r} (it expired or another run took it)") from None
        except RedisError as error:
            raise LockUnreachable(f"cannot reach Redis to keep the lock of {self.database!r}: {error}") from None

    def release(self) -> None:
        self._lock.local.token = self.owner.encode()
        try:
            self._lock.release()
        except (LockNotOwnedError, LockError, RedisError):
            pass  # not ours any more (expired, or taken by another run): nothing to release

    def holder(self) -> str | None:
        try:
            value = self._client.get(self._key)
        except RedisError:
            return None
        return value.decode() if isinstance(value, bytes) else value


class FileDatabaseLock:
    """For in-process runs without a broker: an exclusive flock on `BACKUP_DIR/.<db>.lock`.

    The file exists only while the lock is held: its holder removes it before unlocking, and a taker
    checks, once it has the flock, that the file it locked is still the one at that name (else the
    previous holder removed it meanwhile, and it tries again)."""

    def __init__(self, directory: Path, database: str, owner: str) -> None:
        self.database = database
        self.owner = owner
        self._path = directory / f".{database}.lock"
        self._descriptor: int | None = None

    def acquire(self) -> None:
        acquire_after_repairs(self._try_acquire, self.holder,
                              lambda holder: busy(self.database, holder, on_this_host=True))

    def _try_acquire(self) -> bool:
        while True:
            descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return False
            try:
                current = os.stat(self._path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(descriptor)):
                break
            os.close(descriptor)  # its holder removed it between our open and our flock: again
        os.ftruncate(descriptor, 0)
        os.write(descriptor, self.owner.encode())
        self._descriptor = descriptor
        return True

    @property
    def lease(self) -> float:
        return float("inf")  # an flock lasts as long as its process

    def confirm(self) -> None:
        if self._descriptor is None:
            raise LockLost(f"the lock of {self.database!r} is not held by this run")

    def hold(self, seconds: float) -> None:
        self.confirm()  # an flock lasts as long as its process: nothing to extend

    def release(self) -> None:
        if self._descriptor is not None:
            try:
                self._path.unlink()  # while still locked: nobody else can hold this file
            except OSError:
                pass  # a read-only folder: the empty lock file stays, harmless
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def holder(self) -> str | None:
        try:
            return self._path.read_text() or None
        except OSError:
            return None


def renewal_interval(settings: Settings) -> float:
    """How often a running step renews its lock: three times per BACKUP_LOCK_TIMEOUT."""
    return max(settings.BACKUP_LOCK_TIMEOUT / 3, 1)


@contextmanager
def kept_alive(lock: DatabaseLock, interval: float) -> Iterator[threading.Event]:
    """Renew the lock every `interval` seconds while the block runs (the caller took or confirmed it right
    before). Redis errors are retried every half second; the yielded event is set the moment the lease
    has run out since the start of the last renewal that succeeded, or at once when the lock is gone or
    taken. The caller confirms the lock before each destructive step and at the end of its work, so a
    lost lock stops it cleanly.

    The lease is watched by its own thread, not by the renewing one: a renewal against a Redis that does
    not answer can block for seconds (redis-py retries a failed command ten times with back-off, each try
    bounded by the client's timeouts), and the holder must not learn that its lease ran out only once that
    call returns, while another run may already have taken the lock. A renewal's lease is counted from
    when it was sent, the earliest it can have started on the server."""
    lost = threading.Event()
    stop = threading.Event()
    lease_ends = time.monotonic() + lock.lease  # from the caller's acquire or confirm, just before

    def renew() -> None:
        nonlocal lease_ends
        wait = interval
        while not stop.wait(wait) and not lost.is_set():
            sent = time.monotonic()
            try:
                lock.confirm()
            except LockUnreachable:
                wait = min(interval, UNREACHABLE_RETRY_SECONDS)
                continue
            except BackupError:
                lost.set()
                return
            lease_ends, wait = max(lease_ends, sent + lock.lease), interval

    def watch() -> None:
        while not lost.is_set():
            remaining = lease_ends - time.monotonic()
            if remaining <= 0:
                lost.set()
                return
            if stop.wait(None if math.isinf(remaining) else remaining):
                return

    threads = [threading.Thread(target=renew, name="lock-renewal", daemon=True),
               threading.Thread(target=watch, name="lock-lease-watch", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield lost
    finally:
        stop.set()
        for thread in threads:
            thread.join()


@contextmanager
def held(lock: DatabaseLock, interval: float) -> Iterator[threading.Event]:
    """Take the lock (or raise LockHeld), keep it alive while the block runs (`kept_alive`), and release
    it afterwards if it is still ours."""
    lock.acquire()
    try:
        with kept_alive(lock, interval) as lost:
            yield lost
    finally:
        lock.release()


_clients: dict[str, redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    return _clients[url]


def lock_owner(settings: Settings, key: str) -> str | None:
    """Who holds the lock stored at `key` (None: nobody). Raises RedisError when Redis is unreachable."""
    if not settings.broker_url:
        return None
    value = redis_client(settings.broker_url).get(key)
    return value.decode() if isinstance(value, bytes) else value


class BrokerlessLock:
    """An in-process run's lock: the flock in BACKUP_DIR, and the Redis lock the workers use when the
    local Redis answers (so that the CLI without a broker and a worker never work on one database at
    once). Both are taken and both must hold."""

    def __init__(self, file_lock: FileDatabaseLock, redis_lock: RedisDatabaseLock | None) -> None:
        self._file = file_lock
        self._redis = redis_lock
        self.lease = redis_lock.lease if redis_lock else file_lock.lease

    def acquire(self) -> None:
        self._file.acquire()
        if self._redis is not None:
            try:
                self._redis.acquire()
            except BaseException:
                self._file.release()
                raise

    def confirm(self) -> None:
        self._file.confirm()
        if self._redis is not None:
            self._redis.confirm()

    def hold(self, seconds: float) -> None:
        self._file.hold(seconds)
        if self._redis is not None:
            self._redis.hold(seconds)

    def release(self) -> None:
        if self._redis is not None:
            self._redis.release()
        self._file.release()

    def holder(self) -> str | None:
        return (self._redis.holder() if self._redis is not None else None) or self._file.holder()


def _local_redis(url: str) -> redis.Redis | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=5)
    try:
        client.ping()
    except RedisError:
        return None
    return client


def database_lock(settings: Settings, database: str, owner: str, server: str | None = None) -> DatabaseLock:
    """The lock for this database on `server` (its identity, `pg.identity.server_identity`; the
    configured address when not given): in Redis when a broker is configured, else an flock in
    BACKUP_DIR together with the local Redis's lock when that Redis answers."""
    server = server or settings.configured_server
    if settings.broker_url:
        return RedisDatabaseLock(redis_client(settings.broker_url), server, database, owner, settings.BACKUP_LOCK_TIMEOUT)
    local = _local_redis(settings.local_redis_url)
    return BrokerlessLock(
        FileDatabaseLock(settings.backup_dir, database, owner),
        RedisDatabaseLock(local, server, database, owner, settings.BACKUP_LOCK_TIMEOUT) if local else None,
    )
