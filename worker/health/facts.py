"""The status facts of one host: what `tma-backup status` judges, as one dict of plain data.

The same dict is printed by the CLI (a line per fact) and by `status --json`, and returned by the
`tma_backup.status` task when a worker host answers for its own BACKUP_DIR. Every section carries its
own `problem` (a reason to exit 1, one line) and `warning` (worth saying, not failing), so that the
answers of several hosts can be merged section by section (`worker.health.combine`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.archive.catalogue import BackupEntry
from worker.errors import BackupError
from worker.health.drill_due import due_since
from worker.settings import Settings

SECTIONS = ("backup", "drill", "repository", "uploads", "connections", "vault")
FINGERPRINT_FIELD = "file_encryption_key_sha256"
MISSING_FIELD = "uploads_missing"
MISSING_NAMES_FIELD = "uploads_missing_names"  # a JSON list of at most a few names
ERROR_FIELD = "uploads_error"  # the capture failed
VERSIONING_FIELD = "uploads_source_versioning"  # STORAGE_DRIVER=s3: whether TMA Cloud's bucket keeps versions


def status_facts(settings: Settings, database: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The facts of `database` (default DB_NAME) as this host sees them. Keys (stable: scripts read them
    through `tma-backup status --json`):

    - `database`, `host` (WORKER_HOST), `checked_at` (UTC, `YYYYmmddTHHMMSSZ`);
    - `ok` (no problem), `problems` and `warnings` (lists of one-line strings, from the sections below);
    - `backup`: the newest complete local backup: `folder`, `file` (name, or null when there is none),
      `timestamp`, `age_hours`, `size` (bytes), `max_age_hours` (BACKUP_MAX_AGE_HOURS),
      `file_encryption_key` (`matches`, `differs`, `not set` or null: FILE_ENCRYPTION_KEY against the
      SHA-256 its .meta records). Problem: none, or older than BACKUP_MAX_AGE_HOURS. Warning: the key differs
      or is not set;
    - `drill`: the last recorded drill: `result` (`pass`, `fail` or null), `at`, `file`, `error`,
      `schedule` (BACKUP_DRILL_SCHEDULE), `scheduled` (whether the schedule drills this database: it
      drills DB_NAME), `due_since` (see `worker.health.drill_due`). Problem: the last drill failed; or it
      is scheduled and none passed since `due_since`; or none was ever recorded although complete
      backups (here or in the repository) go back beyond `due_since`. A fresh install with no drill yet is
      a warning;
    - `repository` (null without BACKUP_REPOSITORY): `address` (without a password), `set` (short id),
      `timestamp`, `age_hours`, `sets` (how many), `max_age_hours`, `error`, `server` (this server's
      identity: the sets counted are the ones it made, `worker.repository.sets.of_server`),
      `recovery_point` (the newest state safely off site: the newest set, or a later run that found nothing
      changed since it), `recovery_point_age_hours`, `max_rpo_hours` (MAX_RPO, or derived from
      BACKUP_SCHEDULE). Problem: cannot be read, holds no set of the database made here, or the recovery
      point is older than BACKUP_MAX_AGE_HOURS or MAX_RPO (ages count from a run that found nothing changed);
    - `uploads` (null unless the newest backup's .meta records the uploads cross-check): `file`,
      `missing` (count), `missing_names`, `error` (why the capture failed, if it did). Problem: `missing` > 0;
    - `vault` (null but on a vault's host, where every other section is null): `worker.vault.facts`;
    - `connections`: `checked`, `refusing`, `error` (why it was not checked). Problem: an interrupted restore left the database refusing
      connections. Warning: the server could not be asked.

    Every section also has `host`, `problem` and `warning`."""
    database = database or settings.DB_NAME
    now = now or datetime.now(timezone.utc)
    host = settings.WORKER_HOST
    if settings.vault is not None:  # a vault's host backs nothing up: its status is the vault's
        from worker.vault.facts import vault_section

        vault: dict[str, dict[str, Any] | None] = {name: None for name in SECTIONS}
        vault["vault"] = {**vault_section(settings, now), "host": host}
        return {"database": database, "host": host, "checked_at": catalogue.utc_timestamp(now), **judged(vault), **vault}
    complete = [entry for entry in catalogue.list_backups(settings.backup_dir, database) if entry.complete]
    newest = complete[-1] if complete else None
    server = _server(settings, database, newest)
    check = _last_check(settings, database, server)
    repository, oldest_set = _repository(settings, database, server, now, check) if settings.repository else (None, None)
    starts = [moment for moment in (complete[0].created if complete else None, oldest_set) if moment is not None]
    sections: dict[str, dict[str, Any] | None] = {
        "backup": _backup(settings, database, newest, now, check),
        "drill": _drill(settings, database, min(starts) if starts else None, now),
        "repository": repository,
        "uploads": _uploads(database, newest),
        "connections": _connections(settings, database),
        "vault": None,
    }
    for section in sections.values():
        if section is not None:
            section["host"] = host
    return {"database": database, "host": host, "checked_at": catalogue.utc_timestamp(now), **judged(sections),
            **sections}


def judged(sections: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """`ok`, `problems` and `warnings` from the sections' own."""
    present = [sections[name] for name in SECTIONS if sections.get(name) is not None]
    problems = [section["problem"] for section in present if section and section.get("problem")]
    warnings = [section["warning"] for section in present if section and section.get("warning")]
    return {"ok": not problems, "problems": problems, "warnings": warnings}


def _hours(since: datetime, now: datetime) -> float:
    return round((now - since).total_seconds() / 3600, 2)


def _last_check(settings: Settings, database: str, server: str) -> dict[str, Any] | None:
    """The last set's record when a run has since found nothing changed (`worker.backup.unchanged`)."""
    from worker.backup.unchanged import read_record

    record = read_record(settings, database, server)
    return record if record is not None and record.get("checked_at") else None


def _current_since(timestamp: str, check: dict[str, Any] | None) -> datetime:
    """When the backup or set of `timestamp` was last known to hold the live state: its own time, or the
    time of the last check that found nothing changed since it."""
    if check is not None and check.get("timestamp") == timestamp:
        return max(catalogue.parse_timestamp(timestamp), catalogue.parse_timestamp(str(check["checked_at"])))
    return catalogue.parse_timestamp(timestamp)


def _backup(settings: Settings, database: str, newest: BackupEntry | None, now: datetime,
            check: dict[str, Any] | None = None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "folder": str(settings.backup_dir), "file": None, "timestamp": None, "age_hours": None, "size": None,
        "max_age_hours": settings.BACKUP_MAX_AGE_HOURS, "file_encryption_key": None, "problem": None,
        "warning": None, "unchanged_checked_at": None,
    }
    if newest is None:
        section["problem"] = f"no complete backup of {database!r} in {settings.backup_dir}"
        return section
    known_at = _current_since(newest.timestamp, check)
    age = _hours(known_at, now)  # a backup that a check found still current is as old as the check
    section.update(file=newest.path.name, timestamp=newest.timestamp, age_hours=age, size=newest.size)
    if known_at > newest.created:
        section["unchanged_checked_at"] = catalogue.utc_timestamp(known_at)
    if age > settings.BACKUP_MAX_AGE_HOURS:
        section["problem"] = (f"newest backup of {database!r} is {age:.1f} h old, over the limit "
                              f"(BACKUP_MAX_AGE_HOURS={settings.BACKUP_MAX_AGE_HOURS:g})")
    recorded = newest.meta.extra.get(FINGERPRINT_FIELD) if newest.meta else None
    if recorded:
        from worker.uploads.crosscheck import key_fingerprint

        key = settings.FILE_ENCRYPTION_KEY
        current = key_fingerprint(key.get_secret_value()) if key else None
        section["file_encryption_key"] = "not set" if current is None else "matches" if current == recorded else "differs"
        if current != recorded:
            section["warning"] = (
                f"the uploads of {newest.path.name} were encrypted with the key whose SHA-256 begins "
                f"{recorded[:12]}, but FILE_ENCRYPTION_KEY here is "
                + ("not set" if current is None else f"another (SHA-256 {current[:12]}…)")
                + ": restored uploads would be unreadable without the old key")
    return section


def _drill(settings: Settings, database: str, history_start: datetime | None, now: datetime) -> dict[str, Any]:
    from worker.restore.drill_record import last_drill

    scheduled = database == settings.DB_NAME
    due = due_since(settings.BACKUP_DRILL_SCHEDULE, now)
    section: dict[str, Any] = {
        "result": None, "at": None, "file": None, "error": None, "schedule": settings.BACKUP_DRILL_SCHEDULE,
        "scheduled": scheduled, "due_since": catalogue.utc_timestamp(due) if due else None, "problem": None,
        "warning": None,
    }
    record = last_drill(settings, database) or {}
    at = _moment(record.get("at"))
    if record.get("result") not in ("pass", "fail") or at is None:
        return _no_drill(section, database, scheduled, due, history_start, bool(record))
    file = record.get("file")
    section.update(result=record["result"], at=record["at"], file=Path(str(file)).name if file else None,
                   error=record.get("error"))
    if record["result"] == "fail":
        section["problem"] = f"the last restore drill of {database!r} failed at {record['at']}: {record.get('error')}"
    elif due is not None and at < due:
        text = (f"no restore drill of {database!r} passed since {due:%Y-%m-%d %H:%M} UTC, two scheduled drills "
                f"ago (BACKUP_DRILL_SCHEDULE={settings.BACKUP_DRILL_SCHEDULE}); the last passed at {record['at']}: "
                "is beat running? `tma-backup drill` runs one now")
        section["problem" if scheduled else "warning"] = text
    return section


def _no_drill(section: dict[str, Any], database: str, scheduled: bool, due: datetime | None,
              history_start: datetime | None, unreadable: bool) -> dict[str, Any]:
    what = "the drill record is unreadable" if unreadable else "no restore drill recorded"
    if scheduled and due is not None and history_start is not None and history_start < due:
        section["problem"] = (
            f"{what} for {database!r}, though complete backups go back to {history_start:%Y-%m-%d %H:%M} UTC, "
            f"before the last two scheduled drills (BACKUP_DRILL_SCHEDULE={section['schedule']}): "
            "is beat running? `tma-backup drill` runs one now")
    else:
        section["warning"] = f"{what} for {database!r} yet (`tma-backup drill` runs one)"
    return section


def _moment(text: Any) -> datetime | None:
    try:
        return catalogue.parse_timestamp(str(text))
    except ValueError:
        return None


def _server(settings: Settings, database: str, newest: BackupEntry | None) -> str:
    """This server's identity: as the newest backup's .meta records it (no connection needed), else asked."""
    recorded = newest.meta.extra.get("server_id") if newest is not None and newest.meta is not None else None
    if recorded:
        return recorded
    from worker.pg.executors import choose_executor
    from worker.pg.identity import server_identity

    try:
        return server_identity(settings, choose_executor(settings), database)
    except BackupError:
        return settings.configured_server


def _repository(settings: Settings, database: str, server: str, now: datetime,
                check: dict[str, Any] | None = None) -> tuple[dict[str, Any], datetime | None]:
    """The newest set of `database` that this server made (`worker.repository.sets.of_server`) in the
    repository, the recovery point, and when its oldest set was made."""
    from worker.coordination.schedule import max_rpo
    from worker.repository.restic import Restic, redacted
    from worker.repository.sets import list_sets, of_server

    limit = max_rpo(settings.BACKUP_SCHEDULE, settings.MAX_RPO)
    section: dict[str, Any] = {
        "address": redacted(settings.repository or ""), "set": None, "timestamp": None, "age_hours": None,
        "sets": None, "max_age_hours": settings.BACKUP_MAX_AGE_HOURS, "error": None, "problem": None,
        "warning": None, "server": server, "recovery_point": None, "recovery_point_age_hours": None,
        "max_rpo_hours": round(limit.total_seconds() / 3600, 3),
    }
    try:
        restic = Restic(settings)
        section["address"] = restic.shown
        sets = of_server(list_sets(restic, database), server)
    except BackupError as error:
        section.update(error=str(error), problem=f"the repository cannot be read: {error}")
        return section, None
    section["sets"] = len(sets)
    if not sets:
        section["problem"] = f"the repository {restic.shown} holds no set of {database!r} made on this server ({server})"
        return section, None
    newest = sets[-1]
    # The recovery point: the newest state safely off site (the newest set, or a later check that found
    # nothing changed since it, when that set was confirmed off site).
    point = _current_since(newest.timestamp, check if check is not None and check.get("off_site") else None)
    age = _hours(point, now)
    section.update(set=newest.short_id, timestamp=newest.timestamp, age_hours=age,
                   recovery_point=catalogue.utc_timestamp(point), recovery_point_age_hours=age)
    if age > settings.BACKUP_MAX_AGE_HOURS:
        section["problem"] = (f"the newest set of {database!r} in the repository is {age:.1f} h old, over the limit "
                              f"(BACKUP_MAX_AGE_HOURS={settings.BACKUP_MAX_AGE_HOURS:g})")
    elif now - point > limit:
        section["problem"] = (f"the recovery point of {database!r} (the newest state safely off site) is "
                              f"{_duration(now - point)} old, over MAX_RPO ({_duration(limit)}"
                              + ("" if settings.MAX_RPO else f", from BACKUP_SCHEDULE {settings.BACKUP_SCHEDULE!r}") + ")")
    return section, catalogue.parse_timestamp(sets[0].timestamp)


def _duration(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _uploads(database: str, newest: BackupEntry | None) -> dict[str, Any] | None:
    """The uploads cross-check the newest backup's .meta records (`uploads_missing`, and up to a few of
    their names in `uploads_missing_names`), or None when it records none."""
    extra = newest.meta.extra if newest is not None and newest.meta is not None else {}
    if newest is None or MISSING_FIELD not in extra:
        return None
    section: dict[str, Any] = {"file": newest.path.name, "missing": None, "missing_names": [], "error": None,
                               "problem": None, "warning": None}
    raw = extra[MISSING_FIELD].strip()
    if not raw.isascii() or not raw.isdigit():
        section["problem"] = (f"{newest.path.name}: its .meta records uploads_missing={raw!r}, not a count; "
                              "the uploads of the newest set cannot be trusted")
        return section
    section["missing"] = missing = int(raw)
    section["missing_names"] = names = _names(extra.get(MISSING_NAMES_FIELD, ""))
    section["error"] = extra.get(ERROR_FIELD) or None
    if extra.get(VERSIONING_FIELD) == "False":
        section["warning"] = ("TMA Cloud's bucket keeps no versions: an object overwritten or deleted there can only "
                              "come back from a set (enable versioning on the bucket)")
    if missing:
        shown = ", ".join(names[:3]) + (", …" if missing > 3 else "")
        why = f"the uploads were not captured ({section['error']})" if section["error"] else \
            "check UPLOAD_DIR or the bucket, then back up again"
        section["problem"] = (f"the newest set of {database!r} ({newest.path.name}) lacks {missing} upload(s) the "
                              f"database references{f' ({shown})' if shown else ''}: they would not come back "
                              f"with a restore; {why}")
    return section


def _names(raw: str) -> list[str]:
    """The recorded names: a JSON list, else one name per line."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return [line for line in raw.split("\n") if line]
    return [str(name) for name in parsed] if isinstance(parsed, list) else [str(parsed)]


def _uploads_swap_pending(settings: Settings, database: str) -> bool:
    from worker.uploads import swap as uploads_swap

    if settings.UPLOAD_DIR is None:
        return False
    try:
        journal = uploads_swap.read_journal(settings.UPLOAD_DIR)
    except (BackupError, OSError):
        return True  # a journal that cannot be read is pending all the same
    return journal is not None and journal.database == database


def _connections(settings: Settings, database: str) -> dict[str, Any]:
    """Whether an interrupted swap left `database` refusing connections. A server that cannot be asked is
    a warning: status is about backups, and reads them without it."""
    from worker.pg.executors import choose_executor
    from worker.restore.repair import left_refusing

    section: dict[str, Any] = {"checked": False, "refusing": None, "error": None, "problem": None, "warning": None,
                               "uploads_swap_pending": _uploads_swap_pending(settings, database)}
    if section["uploads_swap_pending"]:
        section["problem"] = (
            f"a restore of {database!r} with uploads was interrupted during its swap (UPLOAD_DIR holds its journal): "
            f"the database and the files may not match; run `tma-backup repair --database {database}`")
    try:
        refusing = left_refusing(settings, choose_executor(settings), database)
    except BackupError as error:
        section.update(error=str(error), warning=f"whether {database!r} accepts connections was not checked ({error})")
        return section
    section.update(checked=True, refusing=refusing)
    if refusing and not section["problem"]:
        section["problem"] = (
            f"database {database!r} is refusing connections: a restore was interrupted during its swap and left it "
            f"so; run `tma-backup repair --database {database}`")
    return section
