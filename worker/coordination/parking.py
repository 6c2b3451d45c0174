"""A backup chain between two links: its lock kept alive by the workers of its host.

A chain holds its database's lock from kickoff to prune (`worker.coordination.locks`), and a running
link renews it every third of its short lease. Between two links nothing of the chain runs: the next
link waits in the host's queue, behind the links of every other chain when several databases are
backed up at once, and the lease could run out there (on the benchmark's eight databases and one
worker process, a chain's meta link waited 10 s behind the other dumps and found its 9 s lock gone).

So a link that hands over to the next one *parks* its run: the lock's key and owner go into its host's
parking hash in Redis, and every worker on that host renews the parked locks, each only while its owner
still holds it, until the next link starts and takes the renewal back. A killed worker host stops
renewing, so its locks still expire within the lease; a run whose next link never comes (a purged
queue) is let go after PARK_LIMIT_SECONDS.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis
from redis.exceptions import RedisError

from worker.coordination.locks import DatabaseLock, RedisDatabaseLock, redis_client, renewal_interval
from worker.errors import BackupError
from worker.settings import Settings

KEY_PREFIX = "tma_backup:parked"
PARK_LIMIT_SECONDS = 6 * 3600
logger = logging.getLogger(__name__)

# Extend the lock's expiry only while `owner` still holds it: never revive a released or taken lock.
_RENEW_IF_OWNED = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


def parking_key(host: str) -> str:
    return f"{KEY_PREFIX}:{host}"


def _parked_lock(lock: DatabaseLock) -> RedisDatabaseLock | None:
    """Only a broker's lock is parked: without a broker the links run back to back in one process."""
    return lock if isinstance(lock, RedisDatabaseLock) else None


def park(settings: Settings, lock: DatabaseLock) -> None:
    """Hand the lock's renewal to the host's workers until the next link starts. A Redis error or a
    lost lock is logged, not raised: the next link confirms the lock before it does anything."""
    parked = _parked_lock(lock)
    if parked is None or not settings.broker_url:
        return
    entry = json.dumps({"owner": parked.owner, "lease": parked.lease, "since": time.time()})
    try:
        redis_client(settings.broker_url).hset(parking_key(settings.WORKER_HOST), parked.key, entry)
        lock.confirm()
    except (RedisError, BackupError) as error:
        logger.warning("cannot park the lock of %r between links: %s", parked.database, error)


def unpark(settings: Settings, lock: DatabaseLock) -> None:
    """The link that starts renews its lock itself from now on."""
    parked = _parked_lock(lock)
    if parked is None or not settings.broker_url:
        return
    try:
        redis_client(settings.broker_url).hdel(parking_key(settings.WORKER_HOST), parked.key)
    except RedisError as error:
        logger.warning("cannot take the lock of %r back from parking: %s", parked.database, error)


def renew_parked(client: redis.Redis, host: str, now: float | None = None) -> int:
    """Renew every lock parked on `host` whose owner still holds it; forget the others and those parked
    longer than PARK_LIMIT_SECONDS. Returns how many were renewed."""
    now = time.time() if now is None else now
    key = parking_key(host)
    renewed = 0
    for field, value in client.hgetall(key).items():
        try:
            entry: dict[str, Any] = json.loads(value)
            owner, lease, since = str(entry["owner"]), float(entry["lease"]), float(entry["since"])
        except (ValueError, KeyError, TypeError):
            client.hdel(key, field)
            continue
        if now - since > PARK_LIMIT_SECONDS or not client.eval(_RENEW_IF_OWNED, 1, field, owner, int(lease * 1000)):
            client.hdel(key, field)
        else:
            renewed += 1
    return renewed


def start_keeper(settings: Settings) -> threading.Thread | None:
    """In a worker's main process: renew this host's parked locks every third of the lease, for as long
    as the process lives."""
    if not settings.broker_url:
        return None
    client, host, interval = redis_client(settings.broker_url), settings.WORKER_HOST, renewal_interval(settings)

    def keep() -> None:
        failing = False
        while True:
            try:
                renew_parked(client, host)
                failing = False
            except RedisError as error:
                if not failing:  # once per outage, not every few seconds
                    logger.warning("cannot renew the locks of chains waiting between links: %s", error)
                failing = True
            time.sleep(interval)

    thread = threading.Thread(target=keep, name="tma-backup-parked-locks", daemon=True)
    thread.start()
    return thread
