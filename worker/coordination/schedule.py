"""Cron schedules (BACKUP_SCHEDULE, BACKUP_DRILL_SCHEDULE, …), in UTC: Celery's crontab for beat, and how
far apart runs may fall (the loss window MAX_RPO). Reading and checking an expression is `worker.coordination.cron`,
which never imports Celery."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from worker.coordination.cron import parse_cron

if TYPE_CHECKING:
    from celery.schedules import crontab


def celery_crontab(expression: str) -> crontab:
    """Beat's schedule for a checked expression (the settings refuse one `parse_cron` refuses)."""
    from celery.schedules import crontab

    minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def longest_gap(expression: str) -> timedelta:
    """The longest time between two runs of a cron expression (UTC), over a fortnight of minutes."""
    schedule = parse_cron(expression)
    start = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday; any fortnight holds every weekly pattern
    fires = [moment for step in range(14 * 24 * 60)
             if schedule.fires_at(moment := start + timedelta(minutes=step))]
    if len(fires) < 2:
        return timedelta(days=366)  # once a year or less: a year is the most a fortnight can say
    gaps = [later - earlier for earlier, later in zip(fires, fires[1:], strict=False)]
    return max(gaps)


def max_rpo(schedule: str, given: str) -> timedelta:
    """MAX_RPO: as given ("45m", "26h", "2d"), else the schedule's longest gap and a quarter of it (at
    least 10 minutes): a run may be late or fail once before the loss window is called too wide."""
    if given:
        amount, unit = int(given[:-1]), given[-1]
        return timedelta(minutes=amount) if unit == "m" else timedelta(hours=amount) if unit == "h" else timedelta(days=amount)
    gap = longest_gap(schedule)
    return gap + max(gap / 4, timedelta(minutes=10))
