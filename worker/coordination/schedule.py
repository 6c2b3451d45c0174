"""Cron expressions (BACKUP_SCHEDULE, BACKUP_DRILL_SCHEDULE) turned into Celery crontab schedules, in UTC."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from celery.schedules import crontab


def parse_cron(expression: str) -> crontab:
    """Five fields: minute hour day-of-month month day-of-week. Raises ValueError on anything else."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("must be a cron expression of five fields, e.g. '0 2 * * *'")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        schedule = crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except Exception as error:  # celery raises ValueError or its own ParseException
        raise ValueError(f"is not a valid cron expression ({error})") from None
    return schedule


def longest_gap(expression: str) -> timedelta:
    """The longest time between two runs of a cron expression (UTC), over a fortnight of minutes."""
    schedule = parse_cron(expression)
    start = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday; any fortnight holds every weekly pattern
    fires = [moment for step in range(14 * 24 * 60)
             if _fires(schedule, moment := start + timedelta(minutes=step))]
    if len(fires) < 2:
        return timedelta(days=366)  # once a year or less: a year is the most a fortnight can say
    gaps = [later - earlier for earlier, later in zip(fires, fires[1:], strict=False)]
    return max(gaps)


def _fires(schedule: crontab, moment: datetime) -> bool:
    return (moment.minute in schedule.minute and moment.hour in schedule.hour
            and moment.isoweekday() % 7 in schedule.day_of_week and moment.day in schedule.day_of_month
            and moment.month in schedule.month_of_year)


def max_rpo(schedule: str, given: str) -> timedelta:
    """MAX_RPO: as given ("45m", "26h", "2d"), else the schedule's longest gap and a quarter of it (at
    least 10 minutes): a run may be late or fail once before the loss window is called too wide."""
    if given:
        amount, unit = int(given[:-1]), given[-1]
        return timedelta(minutes=amount) if unit == "m" else timedelta(hours=amount) if unit == "h" else timedelta(days=amount)
    gap = longest_gap(schedule)
    return gap + max(gap / 4, timedelta(minutes=10))
