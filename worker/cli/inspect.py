"""`tma-backup verify | list | status`: look at backups without changing anything."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import click

from worker.archive import catalogue
from worker.archive.meta import human_size
from worker.cli import output
from worker.cli.common import database_option, guarded, printable
from worker.errors import BackupError
from worker.settings import Settings, get_settings


@click.command("verify")
@click.argument("file")
@guarded
def verify_command(file: str) -> None:
    """Check FILE's SHA-256 against its .meta and its TOC with pg_restore --list (no database needed)."""
    from worker.archive.verification import verify_backup
    from worker.pg.executors import choose_executor

    settings = get_settings()
    path = catalogue.locate(settings.backup_dir, file)
    output.section("Verify Backup")
    output.info(f"File       : {printable(str(path))}")
    checked = verify_backup(path, settings, choose_executor(settings))
    output.ok(f"SHA-256    : {checked.meta.sha256} (matches .meta)")
    output.ok(f"TOC entries: {checked.toc_entries} (matches .meta)")
    output.ok(f"Tables     : {len(checked.meta.row_counts)}, {sum(checked.meta.row_counts.values())} rows at backup time")
    output.ok("Backup is intact.")


@click.command("list")
@guarded
def list_command() -> None:
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


@click.command("status")
@click.option("--database", "-d", help="Database to report on (default: DB_NAME).")
@guarded
def status_command(database: str | None) -> None:
    """Newest complete backup, its age and size, and the newest set in the repository; exit 1 when either
    is older than BACKUP_MAX_AGE_HOURS, the repository cannot be read, or an interrupted restore has left
    the database refusing connections (`tma-backup repair` fixes it)."""
    settings = get_settings()
    database = database_option(database, settings)
    newest = catalogue.newest_complete(settings.backup_dir, database)
    output.section(f"Backup Status: {database}")
    refusing = _left_refusing(settings, database)
    if newest is None:
        raise BackupError(refusing or f"no complete backup of {database!r} in {settings.backup_dir}")
    age_hours = (datetime.now(timezone.utc) - newest.created).total_seconds() / 3600
    output.info(f"Newest     : {printable(newest.path.name)}")
    output.info(f"Size       : {human_size(newest.size)}")
    output.info(f"Age        : {age_hours:.1f} h (limit BACKUP_MAX_AGE_HOURS={settings.BACKUP_MAX_AGE_HOURS:g})")
    from worker.restore.drills import last_drill

    drill = last_drill(settings, database)
    if drill is None:
        output.warn("Last drill : none recorded (tma-backup drill)")
    elif drill["result"] == "pass":
        output.info(f"Last drill : passed at {drill['at']} ({Path(drill['file']).name})")
    else:
        output.warn(f"Last drill : FAILED at {drill['at']}: {drill.get('error', '')}")
    offsite_problem = _repository_status(settings, database) if settings.repository else None
    if refusing:
        raise BackupError(refusing)
    if age_hours > settings.BACKUP_MAX_AGE_HOURS:
        raise BackupError(f"newest backup of {database!r} is {age_hours:.1f} h old, over the limit")
    if offsite_problem:
        raise BackupError(offsite_problem)
    output.ok("Backups are current" + (", here and off site." if settings.repository else "."))


def _repository_status(settings: Settings, database: str) -> str | None:
    """Show the newest set of `database` in the repository; the problem to fail on, else None."""
    from worker.repository.restic import Restic
    from worker.repository.sets import list_sets

    try:
        restic = Restic(settings)
        sets = list_sets(restic, database)
    except BackupError as error:
        output.warn(f"Off site   : cannot read the repository ({error})")
        return f"the repository cannot be read: {error}"
    if not sets:
        output.warn(f"Off site   : no set of {database!r} in {restic.shown}")
        return f"the repository {restic.shown} holds no set of {database!r}"
    newest = sets[-1]
    age_hours = (datetime.now(timezone.utc) - catalogue.parse_timestamp(newest.timestamp)).total_seconds() / 3600
    output.info(f"Off site   : set {newest.short_id} of {newest.timestamp}, {age_hours:.1f} h old, in {restic.shown} "
                f"({len(sets)} set(s))")
    if age_hours > settings.BACKUP_MAX_AGE_HOURS:
        return f"the newest set of {database!r} in the repository is {age_hours:.1f} h old, over the limit"
    return None


def _left_refusing(settings: Settings, database: str) -> str | None:
    """The error to report when an interrupted swap left `database` refusing connections, else None.
    A server that cannot be asked is a warning: status is about backups, and reads them without it."""
    from worker.pg.executors import choose_executor
    from worker.restore.repair import left_refusing

    try:
        refusing = left_refusing(settings, choose_executor(settings), database)
    except BackupError as error:
        output.warn(f"Connections: not checked ({error})")
        return None
    if not refusing:
        return None
    return (f"database {database!r} is refusing connections: a restore was interrupted during its swap and left it "
            f"so; run `tma-backup repair --database {database}`")
