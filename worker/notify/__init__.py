"""Telling people: Apprise notifications (NOTIFY_URLS) and the dead-man's-switch ping (HEALTHCHECK_URL).

One message per event (a failed backup, drill, off-site copy or repository check, uploads missing from a
set, a database left refusing connections, a scheduled backup skipped because the database was busy;
with NOTIFY_ON=all also a backup that succeeded and a drill that passed): what happened, the database
and server, the error line, the run id, what to do next. Messages are built from those safe fields
only, and every secret setting's value is scrubbed out of them as a last line of defence.

The ping follows the healthchecks.io convention: `URL/start` when a backup run starts, `URL` when it
succeeds, `URL/fail` when it fails, the one-line summary as the POST body (and the run's UUID as `rid`,
so that concurrent runs pair up).

Delivery can never fail or hold up a run for long: every message and ping goes to a background thread
of this process (pings in one ordered lane, so `start` always goes before `fail`; messages in another);
the caller waits at most NOTIFY_TIMEOUT for their first attempt and returns. A failed or unanswered
attempt is one warning line (`worker.notify` logger: the worker's log; `[WARN]` in the CLI), then a few
retries in the background while the process lives. Nothing here raises into its caller.
"""

from __future__ import annotations

import contextvars
import functools
import heapq
import itertools
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

from worker.errors import first_line
from worker.notify.urls import describe, describe_healthcheck, instantiate, quiet_apprise, secret_parts, split_urls
from worker.settings import SECRET_SETTINGS, Settings

log = logging.getLogger("worker.notify")

# After a failed first attempt: this many more, this long apart; then the message is given up (logged).
RETRY_DELAYS = (5.0, 20.0, 60.0)
# A secret shorter than this is not scrubbed (it would mangle ordinary words); the settings' secrets
# are all far longer in any real set-up.
MIN_SCRUBBED = 4
MAX_PING_BODY = 10_000  # bytes; healthchecks.io keeps the first 100 kB

_P = ParamSpec("_P")
_R = TypeVar("_R")
PingKind = Literal["start", "success", "fail"]


def _never_raises(function: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """Notifications are best effort: whatever goes wrong here is one warning, never the caller's failure."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            log.warning("notification not sent (%s: %s)", type(error).__name__, _scrub_text(first_line(error)))
            return None

    return wrapper


# ── secrets ──────────────────────────────────────────────────────────────────────────────────────────────


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value these settings hold, longest first: the SECRET_SETTINGS (passwords, keys,
    tokens, the notification URLs themselves and their parts), the repository's password file, and a
    password inside the repository's or the broker's address."""
    found: list[str] = []
    for name in SECRET_SETTINGS:
        value = getattr(settings, name, None)
        if value is None:
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        found.append(text)
        if name == "NOTIFY_URLS":
            for url in text.split() + split_urls(text):
                found += secret_parts(url)
        elif name == "HEALTHCHECK_URL":
            found += secret_parts(text)
    password_file = getattr(settings, "BACKUP_REPOSITORY_PASSWORD_FILE", None)
    if password_file is not None:
        try:
            found += password_file.read_text().splitlines()[:1]
        except (OSError, UnicodeDecodeError):
            pass
    for address in (settings.BACKUP_REPOSITORY, settings.CELERY_BROKER_URL, settings.CELERY_RESULT_BACKEND):
        if address:
            try:
                password = urlsplit(address.split(":", 1)[1] if address.startswith(("s3:", "rest:")) else address).password
            except ValueError:
                password = None
            if password:
                found.append(password)
    unique = {value.strip() for value in found if len(value.strip()) >= MIN_SCRUBBED}
    return sorted(unique, key=len, reverse=True)


def scrub(text: str, settings: Settings) -> str:
    """`text` with every secret of `settings` replaced by `***`."""
    for secret in secrets_of(settings):
        text = text.replace(secret, "***")
    return text


def _scrub_text(text: str) -> str:
    """Scrub with the process's settings when they can be read (they were, for anything to be sent)."""
    try:
        from worker.settings import get_settings

        return scrub(text, get_settings())
    except Exception:
        return text


# ── messages ─────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Event:
    """One thing worth telling: `headline` ("backup of 'tma' FAILED"), `what` (a sentence), the safe
    fields, and the next step."""

    kind: str
    headline: str
    what: str
    next_step: str
    database: str | None = None
    error: str | None = None
    run_id: str | None = None
    failure: bool = True
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def compose(settings: Settings, event: Event) -> tuple[str, str]:
    """The title and body of `event`'s message, scrubbed."""
    rows = [("Database", event.database or "(all)"),
            ("Server", f"{settings.configured_server} (worker host {settings.WORKER_HOST})")]
    if event.error:
        rows.append(("Error", " ".join(event.error.split())))
    rows += list(event.extra)
    if event.run_id:
        rows.append(("Run", event.run_id))
    rows.append(("Next", event.next_step))
    width = max(len(label) for label, _ in rows)
    body = event.what + "\n\n" + "\n".join(f"{label.ljust(width)} : {value}" for label, value in rows)
    title = f"tma-backup on {settings.WORKER_HOST}: {event.headline}"
    return scrub(title, settings), scrub(body, settings)


def _error_text(error: BaseException | str) -> str:
    if isinstance(error, str):
        return first_line(Exception(error))
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return first_line(error)


# ── delivery ─────────────────────────────────────────────────────────────────────────────────────────────


class DeliveryFailed(Exception):
    """One attempt to deliver a message or a ping failed; the message says why (no URL in it)."""


class _Job:
    def __init__(self, what: str, send: Callable[[], None], key: str | None = None) -> None:
        self.what = what  # "the healthcheck ping /fail (https://hc-ping.com/…)": never a secret
        self.send = send
        self.key = key  # pings of one run: a newer one makes an older one's pending retry pointless
        self.attempted = threading.Event()
        self.tries = 0
        self._warned = False
        self._guard = threading.Lock()

    def warn_once(self, message: str) -> None:
        with self._guard:
            if self._warned:
                return
            self._warned = True
        log.warning("%s", _scrub_text(message))


class _Lane:
    """One background thread sending jobs in order, retrying failed ones later (per process: a forked
    Celery pool child starts its own)."""

    def __init__(self, name: str, supersede: bool) -> None:
        self.name = name
        self.supersede = supersede
        self._pid: int | None = None
        self._queue: queue.Queue[_Job] = queue.Queue()

    def submit(self, job: _Job) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = queue.Queue()
            threading.Thread(target=self._run, args=(self._queue,), name=f"tma-backup-{self.name}",
                             daemon=True).start()
        self._queue.put(job)

    def _run(self, jobs: queue.Queue[_Job]) -> None:
        delayed: list[tuple[float, int, _Job]] = []
        order = itertools.count()
        while True:
            try:
                timeout = max(0.0, delayed[0][0] - time.monotonic()) if delayed else None
                try:
                    job = jobs.get(timeout=timeout)
                except queue.Empty:
                    job = heapq.heappop(delayed)[2]
                else:
                    if self.supersede and job.key is not None:
                        superseded = [entry for entry in delayed if entry[2].key == job.key]
                        for entry in superseded:
                            log.info("not retrying %s: %s supersedes it", entry[2].what, job.what)
                        delayed = [entry for entry in delayed if entry[2].key != job.key]
                        heapq.heapify(delayed)
                retry_in = _attempt(job)
                if retry_in is not None:
                    heapq.heappush(delayed, (time.monotonic() + retry_in, next(order), job))
            except Exception:  # never let the lane die: the next job still goes out
                log.warning("notification thread: unexpected error; going on")


def _attempt(job: _Job) -> float | None:
    """Try once; the delay before the next try, or None (delivered, or given up)."""
    try:
        job.send()
    except Exception as error:
        job.tries += 1
        reason = first_line(error)
        left = len(RETRY_DELAYS) - job.tries + 1
        if job.tries == 1:
            job.warn_once(f"could not deliver {job.what}: {reason}; trying again in the background "
                          f"({left} more tries at most)")
        else:
            log.info("%s", _scrub_text(f"try {job.tries} of {job.what} failed: {reason}"
                                       + ("" if left > 0 else "; given up")))
        job.attempted.set()
        return RETRY_DELAYS[job.tries - 1] if left > 0 else None
    if job.tries:
        log.info("%s delivered on try %d", job.what, job.tries + 1)
    job.attempted.set()
    return None


_PINGS = _Lane("pings", supersede=True)
_MESSAGES = _Lane("notifications", supersede=False)


def _reset_after_fork() -> None:  # a pool child: its parent's threads are not there
    for lane in (_PINGS, _MESSAGES):
        lane._pid = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _deliver(settings: Settings, jobs: list[tuple[_Lane, _Job]], wait: bool = True) -> None:
    """Hand the jobs to their lanes; wait at most NOTIFY_TIMEOUT, in all, for their first attempts."""
    for lane, job in jobs:
        lane.submit(job)
    if not wait:
        return
    deadline = time.monotonic() + settings.NOTIFY_TIMEOUT
    for _, job in jobs:
        if not job.attempted.wait(max(0.0, deadline - time.monotonic())):
            job.warn_once(f"{job.what} not delivered within NOTIFY_TIMEOUT ({settings.NOTIFY_TIMEOUT:g}s): "
                          "left to the background (a few more tries while this process runs)")


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


def _message_jobs(settings: Settings, title: str, body: str, failure: bool) -> list[tuple[_Lane, _Job]]:
    if settings.NOTIFY_URLS is None:
        return []
    jobs = []
    for number, url in enumerate(split_urls(settings.NOTIFY_URLS.get_secret_value()), start=1):
        what = f"the notification \u201c{title}\u201d to {describe(url, number)}"
        send = functools.partial(send_one, url, title, body, failure, settings.NOTIFY_TIMEOUT)
        jobs.append((_MESSAGES, _Job(what, send)))
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


def _ping_jobs(settings: Settings, kind: PingKind, summary: str, run_id: str | None) -> list[tuple[_Lane, _Job]]:
    if settings.HEALTHCHECK_URL is None:
        return []
    base = settings.HEALTHCHECK_URL.get_secret_value()
    url = ping_url(base, kind, run_id)
    body = scrub(" ".join(summary.split()), settings)
    what = f"the healthcheck ping {'(success)' if kind == 'success' else '/' + kind} ({describe_healthcheck(base)})"
    send = functools.partial(send_ping, url, body, settings.NOTIFY_TIMEOUT)
    return [(_PINGS, _Job(what, send, key=run_id or "run"))]


# ── events ───────────────────────────────────────────────────────────────────────────────────────────────


def _notify(settings: Settings, event: Event, ping: tuple[PingKind, str] | None = None, wait: bool = True) -> None:
    jobs: list[tuple[_Lane, _Job]] = []
    if ping is not None:
        jobs += _ping_jobs(settings, ping[0], ping[1], event.run_id)
    if event.failure or settings.NOTIFY_ON == "all":
        title, body = compose(settings, event)
        jobs += _message_jobs(settings, title, body, event.failure)
    if jobs:
        _deliver(settings, jobs, wait)


@_never_raises
def backup_started(settings: Settings, database: str, run_id: str, wait: bool = True) -> None:
    """The run has its lock and starts: `HEALTHCHECK_URL/start`. `wait=False` where the same process
    sends the run's end (in-process runs): the ordered lane keeps `start` first, and the run is held up
    once at most, at its end."""
    if settings.HEALTHCHECK_URL is None:
        return
    summary = f"backup of {database!r} started on {settings.WORKER_HOST} (run {run_id})"
    _deliver(settings, _ping_jobs(settings, "start", summary, run_id), wait)


@_never_raises
def backup_succeeded(settings: Settings, summary: Mapping[str, Any], run_id: str) -> None:
    """The final link succeeded: the success ping, and with NOTIFY_ON=all a message."""
    database = str(summary.get("database", ""))
    name = os.path.basename(str(summary.get("backup", "")))
    line = (f"backup of {database!r} complete: {name}, {summary.get('size', '?')}, "
            f"{float(summary.get('duration_seconds', 0)):.1f}s, {summary.get('tables', '?')} tables")
    offsite = summary.get("offsite")
    extra: list[tuple[str, str]] = [("Backup", name), ("Size", str(summary.get("size", "?")))]
    if isinstance(offsite, Mapping) and offsite.get("set"):
        line += f", off site as set {offsite['set']}"
        extra.append(("Off site", f"set {offsite['set']}"))
    event = Event("backup_succeeded", f"backup of {database!r} succeeded", line[0].upper() + line[1:] + ".",
                  "nothing to do; `tma-backup status` shows the newest backups", database=database, run_id=run_id,
                  failure=False, extra=tuple(extra))
    _notify(settings, event, ("success", line + f" (run {run_id})"))
    uploads = summary.get("uploads")
    if isinstance(uploads, Mapping) and int(uploads.get("missing", 0) or 0) > 0:
        set_id = str(offsite["set"]) if isinstance(offsite, Mapping) and offsite.get("set") else None
        uploads_missing(settings, database, int(uploads["missing"]), run_id, set_id)


@_never_raises
def backup_failed(settings: Settings, database: str, run_id: str | None, error: BaseException | str,
                  link: str | None = None) -> None:
    """A link failed (or the run could not start): the fail ping and a message."""
    text = _error_text(error)
    where = f" at the {link} link" if link else ""
    if link == "offsite":
        what = (f"The backup of {database!r} was made and kept here, but sending it to the repository "
                "(BACKUP_REPOSITORY) failed: the off-site copy is missing.")
        next_step = (f"fix the repository's reachability or credentials, check it with `tma-backup repository list "
                     f"--database {database}`, then run `tma-backup backup --database {database}` (it also sends "
                     "what earlier runs could not)")
    else:
        what = f"The backup of {database!r} failed{where}; nothing partial was kept, earlier backups are untouched."
        next_step = (f"fix the cause in the error line, then run `tma-backup backup --database {database}`; "
                     "`tma-backup status` shows the newest good backup")
    event = Event("backup_failed", f"backup of {database!r} FAILED{where}", what, next_step, database=database,
                  error=text, run_id=run_id)
    _notify(settings, event, ("fail", f"backup of {database!r} failed{where}: {text} (run {run_id})"))


@_never_raises
def backup_skipped(settings: Settings, database: str, reason: str, run_id: str | None) -> None:
    """A scheduled backup found the database busy (its lock held) and did not run."""
    event = Event(
        "backup_skipped", f"scheduled backup of {database!r} SKIPPED (busy)",
        f"The scheduled backup of {database!r} did not run: the database was busy.",
        "if it repeats, see which run holds the lock (`tma-backup status`, the workers' logs); take a backup "
        f"now with `tma-backup backup --database {database}` once it is free",
        database=database, error=_error_text(reason), run_id=run_id)
    _notify(settings, event)


@_never_raises
def drill_failed(settings: Settings, database: str, error: BaseException | str, run_id: str | None,
                 file: str | None = None, from_repository: str | None = None) -> None:
    extra = []
    if file:
        extra.append(("Backup", os.path.basename(file)))
    if from_repository:
        extra.append(("Repository", f"set {from_repository}"))
    source = " from the repository" if from_repository else ""
    event = Event(
        "drill_failed", f"restore drill of {database!r} FAILED",
        f"A restore drill{source} of {database!r} failed: the backup could not be proven restorable.",
        f"run `tma-backup drill --database {database}` to see it again; take a new backup with "
        f"`tma-backup backup --database {database}` and drill that; `tma-backup status` shows the last drill",
        database=database, error=_error_text(error), run_id=run_id, extra=tuple(extra))
    _notify(settings, event)


@_never_raises
def drill_passed(settings: Settings, result: Mapping[str, Any], run_id: str | None) -> None:
    """With NOTIFY_ON=all: a drill passed."""
    if settings.NOTIFY_ON != "all":
        return
    database = str(result.get("database", ""))
    event = Event(
        "drill_passed", f"restore drill of {database!r} passed",
        f"A restore drill of {database!r} passed: {result.get('tables', '?')} tables, {result.get('rows', '?')} rows "
        f"restored and counted in {float(result.get('duration_seconds', 0)):.1f}s.",
        "nothing to do", database=database, run_id=run_id, failure=False,
        extra=(("Backup", os.path.basename(str(result.get("file", "")))),))
    _notify(settings, event)


@_never_raises
def repository_failed(settings: Settings, operation: str, error: BaseException | str, run_id: str | None) -> None:
    """The repository's prune or check (maintenance) failed."""
    event = Event(
        "repository_failed", f"repository {operation} FAILED",
        f"The off-site repository's {operation} failed (BACKUP_REPOSITORY).",
        "run `tma-backup repository check` to see it again; `tma-backup repository list` shows the sets; "
        "`tma-backup status` says whether the newest set is recent",
        error=_error_text(error), run_id=run_id)
    _notify(settings, event)


@_never_raises
def uploads_missing(settings: Settings, database: str, count: int, run_id: str | None,
                    set_id: str | None = None) -> None:
    """A set's cross-check found `count` uploads the database references but the set lacks."""
    extra = (("Set", set_id),) if set_id else ()
    event = Event(
        "uploads_missing", f"{count} upload(s) MISSING from the set of {database!r}",
        f"{count} upload(s) that {database!r} references are missing from its set: a restore would bring back "
        "rows whose files are gone.",
        "check UPLOAD_DIR or the bucket (STORAGE_DRIVER) on the worker's host, then take a new backup with "
        f"`tma-backup backup --database {database}`; `tma-backup status` shows the newest set",
        database=database, error=f"{count} referenced upload(s) missing", run_id=run_id, extra=extra)
    _notify(settings, event)


@_never_raises
def left_refusing(settings: Settings, failures: Mapping[str, str], run_id: str | None,
                  still_refusing: Callable[[str], bool] | None = None, once_per_seconds: int = 24 * 3600) -> None:
    """A repair failed for `failures` ({database: error line}); those `still_refusing` (asked of the
    server; a database whose state cannot be told counts) were left refusing connections by an
    interrupted restore. The scheduled repair runs every few minutes: one message per database a day."""
    for database, error in sorted(failures.items()):
        try:
            refusing = still_refusing is None or still_refusing(database)
        except Exception:
            refusing = True
        if not refusing or not _first_time(settings, f"tma_backup:notified:left-refusing:{database}",
                                           once_per_seconds):
            continue
        event = Event(
            "left_refusing", f"{database!r} is REFUSING CONNECTIONS",
            f"The database {database!r} was left refusing connections by an interrupted restore, and the "
            "automatic repair could not re-enable it: the application cannot connect.",
            f"run `tma-backup repair --database {database}`; if it fails again, see the error line (the server's "
            f"logs, permissions) and, as a last resort, `ALTER DATABASE ... ALLOW_CONNECTIONS true`",
            database=database, error=error, run_id=run_id)
        _notify(settings, event)


def _first_time(settings: Settings, key: str, seconds: int) -> bool:
    """Whether `key` was not seen in the last `seconds` (kept in Redis, with a broker); True without one
    or when Redis cannot say."""
    if not settings.broker_url:
        return True
    try:
        from worker.coordination.locks import redis_client

        return bool(redis_client(settings.broker_url).set(key, "1", nx=True, ex=seconds))
    except Exception:
        return True


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
