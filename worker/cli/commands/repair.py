"""`tma-backup repair`: re-enable a database an interrupted swap left refusing connections, drop the
scratch and drill databases interrupted runs left behind. Workers also run it when they start and
every few minutes (beat); this is the operator's way to run it now."""

from __future__ import annotations

import uuid
from typing import Any

import click

from worker.cli import output
from worker.cli.common import database_option, guarded, printable
from worker.cli.follow import call_task
from worker.errors import BackupError
from worker.settings import get_settings


@click.command("repair")
@click.option("--database", "-d", help="Only this database (default: every database with something to repair).")
@click.option("--host", help="The worker host whose database server to repair.")
@guarded
def repair_command(database: str | None, host: str | None) -> None:
    """Repair what interrupted restores and drills left: a database left refusing connections by a swap
    (only one tma-backup marked; never an operator's own ALLOW_CONNECTIONS false), and scratch and drill
    databases. Kept previous copies are never touched. A database whose lock is held (a restore, backup
    or drill is running) is skipped. Exit 0 when nothing is left broken, 1 when something could not be
    repaired."""
    settings = get_settings()
    database = database_option(database, settings) if database is not None else None
    output.section("Repair" + (f": {database}" if database else ""))
    report: dict[str, Any]
    if settings.broker_url:
        report = dict(call_task(settings, "tma_backup.repair", {"database": database}, host))
    else:
        from worker.pg.executors import choose_executor
        from worker.restore import repair

        executor = choose_executor(settings)
        lock_for = repair.locks_for(settings, executor, f"local-{uuid.uuid4()}")
        report = repair.repair(settings, executor, database, lock_for)
    _show(report, database)


def _show(report: dict[str, Any], database: str | None) -> None:
    from worker.restore.repair import summary

    for name, done in report["fixed"].items():
        output.ok(f"{printable(name)}: {summary(done)}")
    for name, why in report["skipped"].items():
        output.warn(f"{printable(name)}: skipped, {why}")
    for name, error in report["failed"].items():
        output.warn(f"{printable(name)}: not repaired: {error}")
    if report.get("removed_staging"):
        output.ok(f"BACKUP_DIR: removed what interrupted fetches left: {', '.join(report['removed_staging'])}")
    if report["left_broken"]:
        hint = ("run `tma-backup repair` again once its restore, backup or drill has finished"
                if not report["failed"] else "see the lines above")
        raise BackupError(f"not repaired: {', '.join(map(printable, report['left_broken']))}; {hint}")
    if not report["fixed"]:
        output.ok(f"Nothing to repair{f' for {database!r}' if database else ''}: no database left refusing "
                  "connections by an interrupted swap, no leftover scratch or drill database.")
    else:
        output.ok("Repaired.")
