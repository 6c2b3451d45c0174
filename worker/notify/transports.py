"""How a message or a ping travels: one Apprise send per NOTIFY_URLS entry, and the dead-man's-switch
ping to HEALTHCHECK_URL; each as a delivery job for its lane, and each tried at once for
`tma-backup notify test`.

The ping follows the healthchecks.io convention: `URL/start` when a backup run starts, `URL` when it
succeeds, `URL/fail` when it fails, the one-line summary as the POST body (and the run's UUID as `rid`,
so that concurrent runs pair up).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from worker.errors import first_line
from worker.notify.delivery import MESSAGES, PINGS, DeliveryFailed, Job, Lane
from worker.notify.scrub import scrub
from worker.notify.urls import describe, describe_healthcheck, instantiate, quiet_apprise, split_urls
from worker.settings import Settings

MAX_PING_BODY = 10_000  # bytes; healthchecks.io keeps the first 100 kB

PingKind = Literal["start", "success", "fail"]


# ── Apprise ──────────────────────────────────────────────────────────────────────────────────────────────


class _Reasons(logging.Handler):
    """Apprise's own warnings, per send (a context variable: Apprise hands its context on to the pool
    threads it may send from): the reason a send failed ("A Connection error occurred sending JSON
    notification to 127.0.0.1."), scrubbed before it is shown."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.current: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("reasons", default=None)

    def emit(self, record: logging.LogRecord) -> None:
        lines = self.current.get()
        if lines is not None:
            try:
                lines.append(first_line(Exception(record.getMessage())))
            except Exception:
                pass


_reasons = _Reasons()


def _apprise_logging() -> None:
    quiet_apprise()
    logger = logging.getLogger("apprise")
    if _reasons not in logger.handlers:
        logger.addHandler(_reasons)
    if logger.level == logging.NOTSET or logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)  # its debug lines carry payloads: never formatted at all


def send_one(url: str, title: str, body: str, failure: bool, timeout: float) -> None:
    """Send one message to one Apprise URL, each network wait bounded by `timeout`; DeliveryFailed
    (with Apprise's reason) when the service did not take it."""
    import apprise

    _apprise_logging()
    notifier = instantiate(url)
    if notifier is None:
        raise DeliveryFailed("Apprise cannot use this URL")
    for plugin in notifier:
        for attribute in ("socket_connect_timeout", "socket_read_timeout"):
            current = getattr(plugin, attribute, None)
            if isinstance(current, (int, float)):
                setattr(plugin, attribute, min(float(current), timeout))
    kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
    reasons: list[str] = []
    token = _reasons.current.set(reasons)
    try:
        delivered = bool(notifier.notify(body=body, title=title, notify_type=kind))
    finally:
        _reasons.current.reset(token)
    if not delivered:
        raise DeliveryFailed(reasons[0] if reasons else "the service did not accept the message")


def message_jobs(settings: Settings, title: str, body: str, failure: bool) -> list[tuple[Lane, Job]]:
    if settings.NOTIFY_URLS is None:
        return []
    jobs = []
    for number, url in enumerate(split_urls(settings.NOTIFY_URLS.get_secret_value()), start=1):
        what = f"the notification \u201c{title}\u201d to {describe(url, number)}"
        send = functools.partial(send_one, url, title, body, failure, settings.NOTIFY_TIMEOUT)
        jobs.append((MESSAGES, Job(what, send)))
    return jobs


# ── the ping ─────────────────────────────────────────────────────────────────────────────────────────────

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def ping_url(base: str, kind: PingKind, run_id: str | None = None) -> str:
    """`base/start`, `base` or `base/fail`, with `rid=<the run's UUID>` when the run id holds one."""
    parts = urlsplit(base.strip())
    path = parts.path.rstrip("/") + ("" if kind == "success" else f"/{kind}")
    query = parts.query
    found = _UUID.search(run_id or "")
    if found:
        query = "&".join(piece for piece in (query, urlencode({"rid": found.group(0).lower()})) if piece)
    return urlunsplit((parts.scheme, parts.netloc, path or "/", query, parts.fragment))


def send_ping(url: str, body: str, timeout: float) -> None:
    """POST `body` to `url`; DeliveryFailed (without the URL) unless it answers 2xx within `timeout`."""
    request = urllib.request.Request(url, data=body.encode("utf-8", "replace")[:MAX_PING_BODY], method="POST",
                                     headers={"Content-Type": "text/plain; charset=utf-8",
                                              "User-Agent": "tma-backup"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only: checked)
            response.read(4096)
    except urllib.error.HTTPError as error:
        raise DeliveryFailed(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DeliveryFailed(first_line(Exception(str(error.reason)))) from None
    except (OSError, ValueError) as error:  # a timeout while reading, a reset connection
        raise DeliveryFailed(first_line(error) if str(error) else type(error).__name__) from None


def ping_jobs(settings: Settings, kind: PingKind, summary: str, run_id: str | None) -> list[tuple[Lane, Job]]:
    if settings.HEALTHCHECK_URL is None:
        return []
    base = settings.HEALTHCHECK_URL.get_secret_value()
    url = ping_url(base, kind, run_id)
    body = scrub(" ".join(summary.split()), settings)
    what = f"the healthcheck ping {'(success)' if kind == 'success' else '/' + kind} ({describe_healthcheck(base)})"
    send = functools.partial(send_ping, url, body, settings.NOTIFY_TIMEOUT)
    return [(PINGS, Job(what, send, key=run_id or "run"))]


# ── `tma-backup notify test` ─────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Trial:
    target: str  # how the URL is shown: never a secret
    delivered: bool
    reason: str = ""


def try_urls(settings: Settings, urls: Iterable[str]) -> list[Trial]:
    """Send a test message to each URL, all at once, each waited for at most NOTIFY_TIMEOUT (+1 s)."""
    title = f"tma-backup on {settings.WORKER_HOST}: test message"
    body = scrub(
        "This is a test message from `tma-backup notify test`: notifications reach this service.\n\n"
        f"Server : {settings.configured_server} (worker host {settings.WORKER_HOST})\n"
        f"Sent on: {'failures' if settings.NOTIFY_ON == 'failure' else 'failures and successes'} "
        f"(NOTIFY_ON={settings.NOTIFY_ON})", settings)
    listed = list(urls)
    results: list[Trial | None] = [None] * len(listed)

    def attempt(index: int, url: str) -> None:
        try:
            send_one(url, title, body, False, settings.NOTIFY_TIMEOUT)
            results[index] = Trial(describe(url, index + 1), True)
        except Exception as error:
            results[index] = Trial(describe(url, index + 1), False, scrub(first_line(error), settings))

    threads = [threading.Thread(target=attempt, args=(index, url), daemon=True) for index, url in enumerate(listed)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + settings.NOTIFY_TIMEOUT + 1
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [result or Trial(describe(url, index + 1), False,
                                  f"no answer within NOTIFY_TIMEOUT ({settings.NOTIFY_TIMEOUT:g}s)")
            for index, (url, result) in enumerate(zip(listed, results, strict=True))]


def try_ping(settings: Settings) -> Trial:
    """`HEALTHCHECK_URL/start` then `HEALTHCHECK_URL` (a complete, successful run for the check)."""
    assert settings.HEALTHCHECK_URL is not None
    base = settings.HEALTHCHECK_URL.get_secret_value()
    target = f"HEALTHCHECK_URL ({describe_healthcheck(base)})"
    try:
        for kind in ("start", "success"):
            send_ping(ping_url(base, kind), "test ping from `tma-backup notify test --ping`", settings.NOTIFY_TIMEOUT)
    except Exception as error:
        return Trial(target, False, scrub(first_line(error), settings))
    return Trial(target, True)
