"""`tma-backup`: backup | verify FILE | list | status (restore and drills in their own modules).

Exit codes: 0 success, 1 failure, 2 bad usage or settings. Errors are one `[ERROR]` line; tracebacks
never reach the operator.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click

from worker import catalogue, output
from worker.errors import BackupError
from worker.meta import human_size
from worker.settings import Settings, SettingsError, check_database_name, ensure_backup_dir, folder_warning, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def guarded(command: F) -> F:
    """One line and the right exit code for every expected failure."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SettingsError as error:
            output.error(str(error))
            sys.exit(2)
        except BackupError as error:
            output.error(str(error))
            sys.exit(1)
        except OSError as error:  # the file system said no (permissions, a full disk, a name too long)
            where = f"{error.filename}: " if error.filename else ""
            output.error(f"{where}{error.strerror or error}")
            sys.exit(1)
        except KeyboardInterrupt:
            output.error("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Back up and restore PostgreSQL through Celery workers (see README)."""


def database_option(given: str | None, settings: Settings) -> str:
    """`--database`, checked like DB_NAME (it names files in BACKUP_DIR), or DB_NAME."""
    if given is None:
        return settings.DB_NAME
    try:
        return check_database_name(given)
    except ValueError as error:
        raise SettingsError(f"--database: {error} (got {given!r})") from None


def printable(name: str) -> str:
    """A file name as one line of plain text: control characters (a newline could fake a row) escaped."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)


PHASE_MESSAGES = {
    "counting rows": "Counting rows exactly, inside the dump's snapshot …",
    "dumping": "Running pg_dump (custom format, serializable snapshot) …",
    "verifying": "Verifying backup integrity (pg_restore --list) …",
    "checksumming": "Computing SHA-256 checksum …",
    "writing meta": "Writing .meta and publishing the backup …",
    "pruning": "Applying retention (BACKUP_RETAIN_COUNT) …",
}


def _progress_printer() -> Callable[[str, dict[str, Any]], None]:
    last_phase: list[str] = [""]

    def show(phase: str, fields: dict[str, Any]) -> None:
        if phase != last_phase[0] and phase in PHASE_MESSAGES:
            last_phase[0] = phase
            output.info(PHASE_MESSAGES[phase])

    return show


def _print_summary(summary: dict[str, Any]) -> None:
    output.ok(f"Backup contains {summary['toc_entries']} TOC entries.")
    if summary["tables"] == 0:
        output.warn("The database has no tables: is DB_NAME the database you meant to back up?")
    output.section("Backup Complete")
    output.ok(f"File       : {summary['backup']}")
    output.ok(f"Size       : {summary['size']} ({summary['size_bytes']} bytes)")
    output.ok(f"Duration   : {summary['duration_seconds']:.1f}s")
    output.ok(f"TOC entries: {summary['toc_entries']}")
    output.ok(f"Tables     : {summary['tables']} (exact row counts in the .meta)")
    output.ok(f"SHA-256    : {summary['sha256']}")
    if summary.get("deleted"):
        output.info(f"Pruned     : {', '.join(summary['deleted'])}")


@cli.command()
@click.option("--database", "-d", help="Database to back up (default: DB_NAME).")
@guarded
def backup(database: str | None) -> None:
    """Take a backup: dump → verify → checksum → meta → prune."""
    settings = get_settings()
    database = database_option(database, settings)
    output.section("Full Database Backup")
    if settings.broker_url:
        summary = _backup_through_workers(settings, database)
    else:
        summary = _backup_in_process(settings, database)
    _print_summary(summary)


def _backup_in_process(settings: Settings, database: str) -> dict[str, Any]:
    from worker.executors import choose_executor
    from worker.inprocess import run_backup

    output.info("No broker configured (CELERY_BROKER_URL unset): running the backup in this process.")
    warning = folder_warning(ensure_backup_dir(settings))
    if warning:
        output.warn(warning)
    executor = choose_executor(settings)
    output.info(f"Tools      : {executor.describe()}")
    output.info(f"Database   : {database}")
    return run_backup(settings, database, executor, _progress_printer())


def _backup_through_workers(settings: Settings, database: str) -> dict[str, Any]:
    from worker import app
    from worker.follow import check_workers, dispatch, follow_backup, sanitized

    STEP_PHASES = {"verify": "verifying", "checksum": "checksumming", "meta": "writing meta", "prune": "pruning"}

    workers = check_workers(app)
    output.info(f"Broker     : {sanitized(settings.broker_url or '')} ({len(workers)} worker(s) answered)")
    output.info(f"Database   : {database}")
    kickoff = dispatch(app, "tma_backup.backup", {"database": database})
    show = _progress_printer()

    def on_event(step: str, state: str, info: Any) -> None:
        if step == "kickoff":
            output.info(f"Run        : {info['run_id']} on worker host {info['host']}")
            output.info(f"Target     : {info['backup']}")
            for warning in info.get("warnings", []):
                output.warn(warning)
        elif state == "RETRY":
            output.warn(f"{step}: {info}; trying again (BACKUP_RETRIES={settings.BACKUP_RETRIES}, with backoff)")
        elif state == "PROGRESS" and isinstance(info, dict):
            show(str(info.get("phase", step)), info)
        elif state == "STARTED" and step in STEP_PHASES:
            show(STEP_PHASES[step], {})

    from worker.locks import lock_owner, renewal_interval

    def owner_of(key: str) -> str | None:
        return lock_owner(settings, key)

    # A link notices a lost lock within one renewal interval and then fails: wait that long (and a
    # little more) for its own report before saying that the run was lost.
    grace = renewal_interval(settings) + 3
    return follow_backup(app, kickoff, settings.FOLLOW_TIMEOUT, on_event, owner_of, grace)


def _resolve_existing(settings: Settings, file: str) -> Path:
    given = Path(file)
    if given.exists():
        return given.absolute()
    in_folder = settings.backup_dir / given.name
    return in_folder if in_folder.exists() else given.absolute()


@cli.command()
@click.argument("file")
@guarded
def verify(file: str) -> None:
    """Check FILE's SHA-256 against its .meta and its TOC with pg_restore --list (no database needed)."""
    from worker.executors import choose_executor
    from worker.verification import verify_backup

    settings = get_settings()
    path = _resolve_existing(settings, file)
    output.section("Verify Backup")
    output.info(f"File       : {printable(str(path))}")
    checked = verify_backup(path, settings, choose_executor(settings))
    output.ok(f"SHA-256    : {checked.meta.sha256} (matches .meta)")
    output.ok(f"TOC entries: {checked.toc_entries} (matches .meta)")
    output.ok(f"Tables     : {len(checked.meta.row_counts)}, {sum(checked.meta.row_counts.values())} rows at backup time")
    output.ok("Backup is intact.")


@cli.command("list")
@guarded
def list_backups() -> None:
    """List backups in BACKUP_DIR: size, date, TOC entries, and whether each is complete."""
    from rich.table import Table
    from rich.text import Text

    settings = get_settings()
    entries = catalogue.list_all_backups(settings.backup_dir)
    output.section(f"Backups in {settings.backup_dir}")
    if not entries:
        output.info("No backups yet.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("File", "Size", "Date (UTC)", "TOC", "State"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            Text(printable(entry.path.name)),  # Text: a name is never read as Rich markup
            human_size(entry.size),
            entry.created.strftime("%Y-%m-%d %H:%M:%S"),
            str(entry.meta.toc_entries) if entry.meta else "-",
            "complete" if entry.complete else f"INCOMPLETE ({entry.problem})",
        )
    output.stdout.print(table)


@cli.command()
@click.option("--database", "-d", help="Database to report on (default: DB_NAME).")
@guarded
def status(database: str | None) -> None:
    """Newest complete backup, its age and size; exit 1 when older than BACKUP_MAX_AGE_HOURS."""
    settings = get_settings()
    database = database_option(database, settings)
    newest = catalogue.newest_complete(settings.backup_dir, database)
    output.section(f"Backup Status: {database}")
    if newest is None:
        raise BackupError(f"no complete backup of {database!r} in {settings.backup_dir}")
    age_hours = (datetime.now(timezone.utc) - newest.created).total_seconds() / 3600
    output.info(f"Newest     : {printable(newest.path.name)}")
    output.info(f"Size       : {human_size(newest.size)}")
    output.info(f"Age        : {age_hours:.1f} h (limit BACKUP_MAX_AGE_HOURS={settings.BACKUP_MAX_AGE_HOURS:g})")
    from worker.drills import last_drill

    drill = last_drill(settings, database)
    if drill is None:
        output.warn("Last drill : none recorded (tma-backup drill)")
    elif drill["result"] == "pass":
        output.info(f"Last drill : passed at {drill['at']} ({Path(drill['file']).name})")
    else:
        output.warn(f"Last drill : FAILED at {drill['at']}: {drill.get('error', '')}")
    if age_hours > settings.BACKUP_MAX_AGE_HOURS:
        raise BackupError(f"newest backup of {database!r} is {age_hours:.1f} h old, over the limit")
    output.ok("Backups are current.")


from worker import cli_restore  # noqa: E402,F401  (registers restore, rollback, drill)


def main() -> None:
    # Import the group by module name: under `python -m worker.cli` this file is `__main__`, and the
    # restore commands register themselves on `worker.cli.cli`, not on `__main__.cli`.
    from worker.cli import cli as group

    group()


if __name__ == "__main__":
    main()
