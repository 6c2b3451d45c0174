"""Cron expressions (BACKUP_SCHEDULE, BACKUP_DRILL_SCHEDULE) turned into Celery crontab schedules, in UTC."""

from __future__ import annotations

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
