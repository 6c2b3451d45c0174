"""The events worth telling. One message per event (a failed backup, drill, off-site copy or repository
check, uploads missing from a set, a database left refusing connections, a scheduled backup skipped
because the database was busy; with NOTIFY_ON=all also a backup that succeeded and a drill that passed),
and a backup run's pings: what happened, the database and server, the error line, the run id, what to
do next. Messages are built from those safe fields only, and scrubbed (`scrub`) before they go.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.errors import first_line
from worker.notify.delivery import Job, Lane, deliver, never_raises
from worker.notify.scrub import scrub
from worker.notify.transports import PingKind, message_jobs, ping_jobs
from worker.settings import Settings

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
            ("Server", f"{settings.configured_server} (worker host {settings.WORKER_HOST})") if settings.vault is None
            else ("Vault host", settings.WORKER_HOST)]
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


# ── events ───────────────────────────────────────────────────────────────────────────────────────────────


def _notify(settings: Settings, event: Event, ping: tuple[PingKind, str] | None = None, wait: bool = True) -> None:
    jobs: list[tuple[Lane, Job]] = []
    if ping is not None:
        jobs += ping_jobs(settings, ping[0], ping[1], event.run_id)
    if event.failure or settings.NOTIFY_ON == "all":
        title, body = compose(settings, event)
        jobs += message_jobs(settings, title, body, event.failure)
    if jobs:
        deliver(settings, jobs, wait)


@never_raises
def backup_started(settings: Settings, database: str, run_id: str, wait: bool = True) -> None:
    """The run has its lock and starts: `HEALTHCHECK_URL/start`. `wait=False` where the same process
    sends the run's end (in-process runs): the ordered lane keeps `start` first, and the run is held up
    once at most, at its end."""
    if settings.HEALTHCHECK_URL is None:
        return
    summary = f"backup of {database!r} started on {settings.WORKER_HOST} (run {run_id})"
    deliver(settings, ping_jobs(settings, "start", summary, run_id), wait)


@never_raises
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


@never_raises
def backup_unchanged(settings: Settings, database: str, record: Mapping[str, Any], run_id: str | None) -> None:
    """A run found nothing changed since the last set and made none: the success ping all the same, so
    the dead-man's switch sees a current check."""
    line = (f"backup of {database!r}: nothing changed since the set of {record.get('timestamp')}, which stays "
            f"current (checked; run {run_id})")
    deliver(settings, ping_jobs(settings, "success", line, run_id), True)


@never_raises
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


@never_raises
def backup_skipped(settings: Settings, database: str, reason: str, run_id: str | None) -> None:
    """A scheduled backup found the database busy (its lock held) and did not run."""
    event = Event(
        "backup_skipped", f"scheduled backup of {database!r} SKIPPED (busy)",
        f"The scheduled backup of {database!r} did not run: the database was busy.",
        "if it repeats, see which run holds the lock (`tma-backup status`, the workers' logs); take a backup "
        f"now with `tma-backup backup --database {database}` once it is free",
        database=database, error=_error_text(reason), run_id=run_id)
    _notify(settings, event)


@never_raises
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


@never_raises
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


@never_raises
def repository_failed(settings: Settings, operation: str, error: BaseException | str, run_id: str | None) -> None:
    """The repository's prune or check (maintenance) failed."""
    event = Event(
        "repository_failed", f"repository {operation} FAILED",
        f"The off-site repository's {operation} failed (BACKUP_REPOSITORY).",
        "run `tma-backup repository check` to see it again; `tma-backup repository list` shows the sets; "
        "`tma-backup status` says whether the newest set is recent",
        error=_error_text(error), run_id=run_id)
    _notify(settings, event)


@never_raises
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


@never_raises
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


@never_raises
def vault_pulled(settings: Settings, result: Mapping[str, Any], active: list[str], run_id: str | None) -> None:
    """A vault's pull ended: one message per new alarm, one a day per problem that lasts (the primary too
    old, unreadable); the ping says success only when nothing is wrong (`active`: the alarms not yet
    acknowledged and the problems), so the dead-man's switch sees a vault in trouble."""
    for alarm in result.get("alarms", []):
        _notify(settings, Event(
            "vault_alarm", "vault ALARM: the primary repository changed as no backup would change it", str(alarm),
            "see what happened on the TMA Cloud host (its repository, its keys); the vault keeps every set it "
            "holds; `tma-backup status` on the vault lists the alarms, `tma-backup vault acknowledge` clears them",
            error=str(alarm), run_id=run_id, extra=(("Vault", str(result.get("vault", ""))),)))
    for problem in result.get("problems", []):
        if _first_time(settings, f"tma_backup:notified:vault:{problem}", 24 * 3600):
            _notify(settings, Event("vault_problem", "vault: the primary looks unwell", str(problem),
                                    "check the TMA Cloud host's backups (`tma-backup status` there)",
                                    error=str(problem), run_id=run_id))
    line = (f"vault pull: {len(result.get('copied', []))} set(s) copied, {result.get('primary_sets', '?')} in the "
            f"primary" + (f"; {len(active)} thing(s) wrong: {active[0]}" if active else ""))
    deliver(settings, ping_jobs(settings, "fail" if active else "success", line, run_id), True)


@never_raises
def vault_failed(settings: Settings, operation: str, error: BaseException | str, run_id: str | None) -> None:
    """A vault's pull or upkeep failed (the primary or the vault cannot be read or written)."""
    event = Event("vault_failed", f"vault {operation} FAILED",
                  f"The vault's {operation} failed: its copy of the sets may fall behind, or the primary may "
                  "have been tampered with.",
                  "run `tma-backup vault pull` on the vault to see it again; `tma-backup status` there",
                  error=_error_text(error), run_id=run_id)
    _notify(settings, event, ("fail", f"vault {operation} failed: {_error_text(error)}"))


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
