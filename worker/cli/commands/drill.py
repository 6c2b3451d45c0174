"""`tma-backup drill`: prove a backup restores, without touching anything live."""

from __future__ import annotations

import uuid

import click

from worker.cli import output
from worker.cli.common import RESTORE_PHASES, database_option, duration, guarded, phase_printer
from worker.cli.follow import call_task
from worker.settings import SettingsError, get_settings


@click.command("drill")
@click.argument("file", required=False)
@click.option("--database", "-d", help="Database whose newest backup to drill (default: DB_NAME). With FILE: "
              "must be the database FILE belongs to.")
@click.option("--host", help="The worker host that holds the backups.")
@click.option("--from-repository", "from_repository", metavar="SET|latest",
              help="Drill the off-site copy: fetch this set (or the latest of --database) from BACKUP_REPOSITORY.")
@guarded
def drill_command(file: str | None, database: str | None, host: str | None, from_repository: str | None) -> None:
    """Restore a backup (default: the newest complete one) into a scratch database, compare exact
    row counts with its .meta, drop the scratch database. Touches nothing live.

    FILE is drilled under the database its .meta names: that database's lock, its record for `status`."""
    settings = get_settings()
    # Without FILE: the newest backup of --database or DB_NAME. With FILE: the file's own database,
    # which the worker reads from its .meta; --database, when given, must agree with it.
    database = database_option(database, settings) if database is not None or file is None else None
    if from_repository is not None:
        if file:
            raise SettingsError("drill: --from-repository replaces FILE")
        if not settings.repository:
            raise SettingsError("drill --from-repository needs BACKUP_REPOSITORY (and its password)")
    output.section("Restore Drill")
    phases = {"fetching from the repository": "Fetching the set from the repository and checking its SHA-256 …",
              **RESTORE_PHASES}
    if settings.broker_url:
        kwargs = {"database": database, "file": file, "from_repository": from_repository}
        result = call_task(settings, "tma_backup.drill", kwargs, host, on_progress=phase_printer(phases))
    else:
        from worker.pg.executors import choose_executor
        from worker.restore import drills

        result = drills.run_and_record(settings, choose_executor(settings), database, file,
                                       f"local-{uuid.uuid4()}", phase_printer(phases),
                                       from_repository=from_repository)
    if result.get("from_repository"):
        output.ok(f"Off site   : set {result['from_repository']['set']} fetched and checked in "
                  f"{result['from_repository']['seconds']:.1f}s")
    output.ok(f"Drill passed ({result['database']}): {result['file']} restores with {result['tables']} tables and "
              f"{result['rows']} rows, equal to its .meta, in {duration(result)}; scratch database dropped")
