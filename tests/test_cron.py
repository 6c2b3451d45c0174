"""`worker.coordination.cron` reads cron expressions without Celery; beat runs Celery's `crontab` of the same
expression. Held together here: whatever ours accepts, Celery accepts and expands to the same five sets, and
every sane expression is accepted. Ours refuses a few forms Celery quietly misreads (listed below)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.coordination.cron import FIELDS, MONTH_NAMES, WEEKDAY_NAMES, parse_cron
from worker.coordination.schedule import celery_crontab


def _celery_sets(expression: str) -> tuple[set[int], ...] | None:
    try:
        schedule = celery_crontab(expression)  # what beat runs
    except Exception:  # ValueError, or Celery's own ParseException
        return None
    return (schedule.minute, schedule.hour, schedule.day_of_month, schedule.month_of_year, schedule.day_of_week)


def _ours(expression: str) -> tuple[set[int], ...] | None:
    try:
        cron = parse_cron(expression)
    except ValueError:
        return None
    return (set(cron.minute), set(cron.hour), set(cron.day_of_month), set(cron.month_of_year), set(cron.day_of_week))


@st.composite
def _sane_field(draw: st.DrawFn, index: int) -> str:
    field = FIELDS[index]
    names = [*field.names, *field.long_names]

    def value() -> str:
        number = draw(st.integers(field.low, field.high))
        if names and draw(st.booleans()):
            name = draw(st.sampled_from(names))
            return draw(st.sampled_from([name, name.upper(), name.capitalize()]))
        return str(number) if draw(st.integers(0, 4)) else f"{number:02d}"

    def part() -> str:
        kind = draw(st.sampled_from(["star", "star_step", "value", "range", "range_step"]))
        step = draw(st.integers(1, field.high - field.low + 2))
        if kind == "star":
            return "*"
        if kind == "star_step":
            return f"*/{step}"
        if kind == "value":
            return value()
        return f"{value()}-{value()}" + (f"/{step}" if kind == "range_step" else "")

    return ",".join(part() for _ in range(draw(st.integers(1, 3))))


_sane = st.tuples(*(_sane_field(index) for index in range(5))).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(_sane)
def test_every_sane_expression_is_accepted_with_the_sets_celery_expands(expression):
    celery = _celery_sets(expression)
    assert celery is not None, expression
    assert _ours(expression) == celery


_JUNK = "0123456789*/-,abcdefjmnorstuyJMS+_K."


@st.composite
def _near_sane_field(draw: st.DrawFn, index: int) -> str:
    """A sane field with one character put in, taken out or replaced: where misreadings live."""
    field = draw(_sane_field(index))
    at = draw(st.integers(0, len(field)))
    change = draw(st.sampled_from(["insert", "delete", "replace"]))
    char = draw(st.sampled_from(_JUNK))
    if change == "insert":
        return field[:at] + char + field[at:]
    rest = field[:at] + (char if change == "replace" else "") + field[at + 1:]
    return rest or char


_junk_field = st.text(alphabet=_JUNK, min_size=1, max_size=8)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 4).flatmap(lambda index: st.tuples(st.just(index), _junk_field | _near_sane_field(index))))
def test_whatever_ours_accepts_celery_accepts_with_the_same_sets(drawn):
    index, junk = drawn
    fields = ["*"] * 5
    fields[index] = junk
    expression = " ".join(fields)
    ours = _ours(expression)
    if ours is not None:
        assert _celery_sets(expression) == ours, expression


@pytest.mark.parametrize("expression", [
    "*/5/2 * * * *",   # Celery reads */5
    "1-5-7 * * * *",   # Celery reads 1-5
    "mon * * * *",     # Celery reads minute 1
    "0 0 * * jan",     # Celery reads Monday
    "+5 * * * *",      # Celery reads 5
    "1_0 * * * *",     # Celery reads 10
    "0 0 * * monkey",  # Celery reads mon
])
def test_forms_celery_quietly_misreads_are_refused(expression):
    assert _celery_sets(expression) is not None  # Celery takes it …
    with pytest.raises(ValueError, match="is not a valid cron expression"):
        parse_cron(expression)  # … and the settings refuse it, naming the field


@pytest.mark.parametrize(("expression", "message"), [
    ("0 2 * *", "five fields"),
    ("61 2 * * *", "minute 61 is outside 0-59"),
    ("0 2 * * 7", "day of week 7 is outside 0-6"),
    ("0 2 0 * *", "day of month 0 is outside 1-31"),
    ("*/0 * * * *", "a step of 0"),
    ("5/2 * * * *", "a step needs '*' or a range"),
    ("0 2 * foo *", "month 'foo' is not a number or a name"),
])
def test_refusals_name_the_field(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_cron(expression)


def test_names_and_wrapping_ranges_read_as_celery_reads_them():
    cron = parse_cron("50-10/5 22-2 * Jun-aug Friday,sat")
    assert cron.minute == {50, 55, 0, 5, 10}
    assert cron.hour == {22, 23, 0, 1, 2}
    assert cron.month_of_year == {6, 7, 8}
    assert cron.day_of_week == {5, 6}
    assert len(MONTH_NAMES) == 12 and len(WEEKDAY_NAMES) == 7


def test_beat_gets_celerys_crontab_of_the_same_expression():
    schedule = celery_crontab("*/15 3 1,15 * 1-5")
    cron = parse_cron("*/15 3 1,15 * 1-5")
    assert (schedule.minute, schedule.hour, schedule.day_of_month, schedule.day_of_week) == (
        cron.minute, cron.hour, cron.day_of_month, cron.day_of_week)
