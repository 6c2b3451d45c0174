"""Cron expressions read without importing Celery (the settings check every schedule on every command).

Five fields, UTC: minute hour day-of-month month day-of-week, each `*`, a number or name, a range `a-b`
(wrapping past the end: `22-2`), a step `*/n` or `a-b/n`, or a comma-separated list of those. Day of week
0-6 with Sunday 0; names `jan`…`dec` and `sun`…`sat` (or written out). A day must match both the
day-of-month and the day-of-week field, as in Celery.

Every expression this accepts expands to exactly the sets Celery's `crontab` gives it, which is what beat
runs (tests/test_cron.py holds the two together). It refuses a few forms that Celery quietly misreads:
`*/5/2` (Celery reads `*/5`), `1-5-7` (`1-5`), a weekday name as a minute, `+5` or `1_0`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime

MONTHS = {name: number for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
WEEKDAYS = {name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
MONTH_NAMES = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
               "october", "november", "december")
WEEKDAY_NAMES = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")

_PART = re.compile(r"(?P<start>\*|[0-9a-z]+)(?:-(?P<end>[0-9a-z]+))?(?:/(?P<step>[0-9]+))?", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]
    long_names: tuple[str, ...] = ()


FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, MONTHS, MONTH_NAMES),
    _Field("day of week", 0, 6, WEEKDAYS, WEEKDAY_NAMES),
)


@dataclass(frozen=True)
class Cron:
    minute: frozenset[int]
    hour: frozenset[int]
    day_of_month: frozenset[int]
    month_of_year: frozenset[int]
    day_of_week: frozenset[int]

    def fires_on(self, day: date) -> bool:
        """The expression runs on that day (both day fields match, as in Celery)."""
        return day.day in self.day_of_month and day.month in self.month_of_year and day.isoweekday() % 7 in self.day_of_week

    def fires_at(self, moment: datetime) -> bool:
        """The expression runs at the minute of `moment` (read in its own time zone: callers pass UTC)."""
        return moment.minute in self.minute and moment.hour in self.hour and self.fires_on(moment)


def parse_cron(expression: str) -> Cron:
    """Raises ValueError, its message one clause to follow the setting's name."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("must be a cron expression of five fields, e.g. '0 2 * * *'")
    try:
        minute, hour, day_of_month, month, day_of_week = (
            frozenset(_expand(spec, field)) for spec, field in zip(fields, FIELDS, strict=True))
    except ValueError as error:
        raise ValueError(f"is not a valid cron expression ({error})") from None
    return Cron(minute, hour, day_of_month, month, day_of_week)


def _expand(spec: str, field: _Field) -> set[int]:
    values: set[int] = set()
    for part in spec.split(","):
        match = _PART.fullmatch(part)
        if match is None:
            raise ValueError(f"{field.name} {part!r} is not a number, name, range or step")
        start, end, step = match["start"], match["end"], match["step"]
        if start == "*":
            if end is not None:
                raise ValueError(f"{field.name} {part!r}: '*' cannot start a range")
            numbers = list(range(field.low, field.high + 1))
        else:
            if step is not None and end is None:
                raise ValueError(f"{field.name} {part!r}: a step needs '*' or a range before it")
            first = _number(start, field)
            last = _number(end, field) if end is not None else first
            numbers = (list(range(first, last + 1)) if first <= last
                       else list(range(first, field.high + 1)) + list(range(field.low, last + 1)))
        every = int(step) if step is not None else 1
        if every == 0:
            raise ValueError(f"{field.name} {part!r}: a step of 0")
        values.update(numbers[::every])
    return values


def _number(token: str, field: _Field) -> int:
    if token.isdigit():
        number = int(token)
    else:
        name = token.lower()
        if name[:3] not in field.names or (len(name) > 3 and name not in field.long_names):
            raise ValueError(f"{field.name} {token!r} is not a number{' or a name' if field.names else ''}")
        number = field.names[name[:3]]
    if not field.low <= number <= field.high:
        raise ValueError(f"{field.name} {number} is outside {field.low}-{field.high}")
    return number
