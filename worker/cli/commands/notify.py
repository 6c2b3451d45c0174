"""`tma-backup notify test`: send a test message to every NOTIFY_URLS entry and say which worked.

Sent from this process with this process's settings (the workers read the same NOTIFY_URLS from the same
`.env` or environment). Exit 0: every URL took it; 1: at least one did not; 2: NOTIFY_URLS unset or
malformed. URLs are shown as their service and host, never with their tokens.
"""

from __future__ import annotations

import logging
import sys

import click

from worker.cli import output
from worker.cli.common import guarded
from worker.settings import SettingsError, get_settings


class _WarnLines(logging.Handler):
    """`worker.notify`'s warnings in the CLI: `[WARN]` lines like every other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            output.warn(record.getMessage())
        except Exception:
            pass


def warn_on_terminal() -> None:
    """Show notification warnings (an unreachable receiver) as `[WARN]` lines; once per process."""
    logger = logging.getLogger("worker.notify")
    if not any(isinstance(handler, _WarnLines) for handler in logger.handlers):
        handler = _WarnLines(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


@click.group("notify")
def notify_command() -> None:
    """Notifications (NOTIFY_URLS, Apprise) and the healthcheck ping (HEALTHCHECK_URL)."""


@notify_command.command("test")
@click.option("--ping", is_flag=True,
              help="Also ping HEALTHCHECK_URL (`/start`, then success: the check sees one good run).")
@guarded
def test_command(ping: bool) -> None:
    """Send a test message to every NOTIFY_URLS entry, each at once and waited for at most NOTIFY_TIMEOUT;
    [OK] or [ERROR] per URL. Exit 0 when all worked, 1 when any failed, 2 when NOTIFY_URLS is unset."""
    from worker import notify
    from worker.notify.urls import split_urls

    settings = get_settings()
    if settings.NOTIFY_URLS is None:
        raise SettingsError("NOTIFY_URLS is not set: give one or more Apprise URLs (e.g. json://host/path, "
                            "mailto://user:password@host), separated by commas or spaces")
    if ping and settings.HEALTHCHECK_URL is None:
        raise SettingsError("HEALTHCHECK_URL is not set: --ping has nothing to ping")
    urls = split_urls(settings.NOTIFY_URLS.get_secret_value())
    output.section("Notification Test")
    output.info(f"Sending a test message to {len(urls)} URL(s) (NOTIFY_TIMEOUT={settings.NOTIFY_TIMEOUT:g}s) …")
    outcomes = notify.try_urls(settings, urls)
    if ping:
        outcomes.append(notify.try_ping(settings))
    for outcome in outcomes:
        if outcome.delivered:
            output.ok(f"{outcome.target}: delivered")
        else:
            output.error(f"{outcome.target}: not delivered ({outcome.reason})")
    failed = sum(not outcome.delivered for outcome in outcomes)
    if failed:
        output.info(f"{len(outcomes) - failed} of {len(outcomes)} delivered.")
        sys.exit(1)
    output.ok(f"All {len(outcomes)} delivered.")
