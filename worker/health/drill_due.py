"""When a restore drill was due, from BACKUP_DRILL_SCHEDULE: the rule `tma-backup status` applies.

A drill must have passed within the last two drill periods, counted in the schedule's own slots rather
than in hours, so that a schedule with uneven gaps (weekdays only, the 1st and the 15th) is judged fairly:

- `due_since` is the second-latest time the schedule fired, counting only fire times at least LATE_START
  old (the scheduled kickoff may wait that long in a queue: its beat entry `expires` after 3600 s), less
  CLOCK_SKEW (the drill stamps its start with the worker's clock, beat fires by its own).
- The last drill passed at or after `due_since`: fine. One scheduled drill that was missed, skipped
  (the database was busy) or is still running is tolerated; two in a row are a problem.
- For the default weekly schedule that asks for a pass within the last 8 to 15 days; for `* * * * *`
  (every minute), within the last hour or so.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from worker.coordination.cron import parse_cron

LATE_START = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)
HORIZON_DAYS = 9 * 366  # far enough for `0 0 29 2 *`; a schedule that never fires within it has no due time


def fire_times_before(expression: str, moment: datetime, count: int) -> list[datetime]:
    """The latest `count` times (UTC, newest first) at or before `moment` at which the cron expression
    fires, with Celery's semantics (day of month and day of week must both match). Fewer when the
    schedule fires fewer times within HORIZON_DAYS."""
    schedule = parse_cron(expression)
    moment = moment.astimezone(timezone.utc)
    hours = sorted(schedule.hour, reverse=True)
    minutes = sorted(schedule.minute, reverse=True)
    found: list[datetime] = []
    day: date = moment.date()
    for _ in range(HORIZON_DAYS):
        if schedule.fires_on(day):
            for hour in hours:
                for minute in minutes:
                    fired = datetime.combine(day, time(hour, minute), timezone.utc)
                    if fired <= moment:
                        found.append(fired)
                        if len(found) == count:
                            return found
        day -= timedelta(days=1)
    return found


def due_since(expression: str, now: datetime) -> datetime | None:
    """The time since which a drill must have passed (see the module's docstring), or None when the
    schedule has not fired twice within HORIZON_DAYS."""
    fired = fire_times_before(expression, now - LATE_START, 2)
    return fired[1] - CLOCK_SKEW if len(fired) == 2 else None
