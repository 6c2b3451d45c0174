"""`tma-backup drill`: prove a backup restores, without touching anything live."""

from __future__ import annotations

import uuid

import click

from worker.cli import output
from worker.cli.common import RESTORE_PHASES, database_option, duration, guarded, phase_printer
from worker.cli.follow import call_task
from worker.settings import get_settings


@click.command("drill")
@click.argument("file", required=False)
@click.option("--database", "-d", help="Database whose newest backup to drill (default: DB_NAME). With FILE: "
              "must be the database FILE belongs to.")
@click.option("--host", help="The worker host that holds the backups.")
@guarded
def drill_command(file: str | None, database: str | None, host: str | None) -> None:
    """Restore a backup (default: the newest complete one) into a scratch database, compare exact
    row counts with its .meta, drop the scratch database. Touches nothing live.

    FILE is drilled under the database its .meta names: that database's lock, its record for `status`."""
    settings = get_settings()
    # Without FILE: the newest backup of --database or DB_NAME. With FILE: the file's own database,
    # which the worker reads from its .meta; --database, when given, must agree with it.
    database = database_option(database, settings) if database is not None or file is None else None
    output.section("Restore Drill")
    if settings.broker_url:
        result = call_task(settings, "tma_backup.drill", {"database": database, "file": file}, host,
                       on_progress=phase_printer(RESTORE_PHASES))
    else:
        from worker.pg.executors import choose_executor
        from worker.restore import drills

        result = drills.run_and_record(settings, choose_executor(settings), database, file,
                                       f"local-{uuid.uuid4()}", phase_printer(RESTORE_PHASES))
    output.ok(f"Drill passed ({result['database']}): {result['file']} restores with {result['tables']} tables and "
              f"{result['rows']} rows, equal to its .meta, in {duration(result)}; scratch database dropped")
