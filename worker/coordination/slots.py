"""One scheduled backup per schedule slot, however many beats send it.

Celery beat has no leader election: a second beat started by mistake (two hosts, or a restarted beat
whose old process lingers) sends every scheduled kickoff again. The database's lock refuses the copy
while the first run works, but a copy that arrives after the first run has finished (a late or paused
beat, a busy queue: a scheduled kickoff is valid for an hour) would make a second backup of the same
slot. So a scheduled kickoff also claims its slot in Redis, `SET NX` with an expiry: the first claim
wins, every later copy for that slot is skipped with a warning.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from redis.exceptions import RedisError

from worker.coordination.cron import parse_cron
from worker.coordination.locks import redis_client
from worker.errors import BackupError
from worker.settings import Settings

KEY_PREFIX = "tma_backup:slot"
LOOKBACK_MINUTES = 60  # the beat entry's `expires` (3600 s): an older kickoff is never run
SLOT_TTL_SECONDS = 2 * 3600  # outlives every copy of the kickoff that could still arrive


def slot_of(expression: str, now: datetime | None = None) -> datetime:
    """The slot a scheduled kickoff running at `now` belongs to: the latest minute at or before `now` at
    which the cron expression fires, within the last hour; else (BACKUP_SCHEDULE differs between beat
    and worker, or a manual `scheduled=True` call) the current minute."""
    minute = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(second=0, microsecond=0)
    schedule = parse_cron(expression)
    for back in range(LOOKBACK_MINUTES + 1):
        candidate = minute - timedelta(minutes=back)
        if schedule.fires_at(candidate):
            return candidate
    return minute


def slot_key(server: str, database: str, slot: datetime) -> str:
    return f"{KEY_PREFIX}:{server}:{database}:{slot:%Y%m%dT%H%MZ}"


def claim_slot(settings: Settings, server: str, database: str, owner: str, now: datetime | None = None) -> str | None:
    """Claim the current schedule slot of `database` on `server` (its identity, as in lock keys) for run
    `owner`. Returns None when the slot is ours, else a one-line reason to skip (the run that claimed it
    first)."""
    if not settings.broker_url:
        return None
    slot = slot_of(settings.BACKUP_SCHEDULE, now)
    key = slot_key(server, database, slot)
    client = redis_client(settings.broker_url)
    try:
        if client.set(key, owner, nx=True, ex=SLOT_TTL_SECONDS):
            return None
        first = client.get(key)
    except RedisError as error:
        raise BackupError(f"cannot reach Redis to claim the schedule slot of {database!r}: {error}") from None
    first_run = first.decode() if isinstance(first, bytes) else first
    return (
        f"the scheduled backup of {database!r} for {slot:%Y-%m-%d %H:%M} UTC was already started by run "
        f"{first_run or 'unknown'} (is a second beat running?)"
    )
