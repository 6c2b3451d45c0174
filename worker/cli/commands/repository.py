"""`tma-backup repository init | list | check | prune`: the off-site restic repository (BACKUP_REPOSITORY).

They run in this process, wherever restic is installed and the repository's address and password are
set (on a worker's host, inside the worker's container, or on a fresh machine after a disaster), and
take the repository's lock like the workers do.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import click

from worker.archive import catalogue
from worker.archive.meta import human_size
from worker.cli import output
from worker.cli.common import guarded, printable
from worker.errors import BackupError
from worker.settings import Settings, SettingsError, check_database_name, get_settings


def _configured() -> Settings:
    settings = get_settings()
    if not settings.repository:
        raise BackupError("BACKUP_REPOSITORY is not set: name a restic repository (a path, s3:https://host/bucket, "
                          "sftp:, rest:, b2:, …) and its password (BACKUP_REPOSITORY_PASSWORD[_FILE])")
    return settings


@click.group("repository")
def repository_command() -> None:
    """The off-site restic repository: create it, list its sets, check it, reclaim space."""


@repository_command.command("init")
@guarded
def init_command() -> None:
    """Create the repository at BACKUP_REPOSITORY (only this command ever creates one)."""
    from worker.repository.maintenance import init

    settings = _configured()
    output.section("Create Repository")
    created = init(settings)
    output.ok(f"Repository : {created['repository']} (id {created['id'][:8] or 'unknown'})")
    output.info("Keep BACKUP_REPOSITORY_PASSWORD safe and somewhere else too: without it no set can ever be read.")


@repository_command.command("list")
@click.option("--database", "-d", help="Only this database's sets.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout, for scripts.")
@guarded
def list_command(database: str | None, as_json: bool) -> None:
    """List the sets: id, database, server, backup time, bytes added, age (oldest first)."""
    from rich.table import Table
    from rich.text import Text

    from worker.repository.restic import Restic
    from worker.repository.sets import list_sets

    settings = _configured()
    if database is not None:
        try:
            check_database_name(database)
        except ValueError as error:
            raise BackupError(f"--database {database!r}: {error}") from None
    restic = Restic(settings)
    sets = list_sets(restic, database)
    now = datetime.now(timezone.utc)
    if as_json:
        for found in sets:
            click.echo(json.dumps({**found.describe(), "age_hours": round(_age(found.timestamp, now), 2)}))
        return
    output.section(f"Sets in {restic.shown}")
    if not sets:
        output.info("No sets yet." + (f" (database {database!r})" if database else ""))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("Set", "Database", "Server", "TMA", "Backup (UTC)", "Added", "Age"):
        table.add_column(column)
    for found in sets:
        table.add_row(
            found.short_id, Text(printable(found.database)), Text(printable(found.server or "-")),
            Text(printable((found.tma_migration or "-").split("_")[0])),
            catalogue.parse_timestamp(found.timestamp).strftime("%Y-%m-%d %H:%M:%S"),
            f"{human_size(found.bytes_added)}B" if found.bytes_added is not None else "-",
            _age_text(_age(found.timestamp, now)),
        )
    output.stdout.print(table)


def _age(timestamp: str, now: datetime) -> float:
    return (now - catalogue.parse_timestamp(timestamp)).total_seconds() / 3600


def _age_text(hours: float) -> str:
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


@repository_command.command("check")
@click.option("--read-data-subset", "subset", metavar="N%",
              help="Also read and verify this share of the data (e.g. 5%, or n/t such as 1/7); default: structure only.")
@guarded
def check_command(subset: str | None) -> None:
    """Check the repository's structure (and a share of its data): restic check."""
    import re

    from worker.repository.maintenance import check

    settings = _configured()
    if subset is not None and not re.fullmatch(r"(100|[1-9][0-9]?)(\.[0-9]+)?%|[1-9][0-9]*/[1-9][0-9]*", subset):
        raise SettingsError(f"--read-data-subset {subset!r}: give a percentage (5%) or n/t (1/7)")
    output.section("Check Repository")
    result = check(settings, f"cli-{uuid.uuid4()}", subset, lambda phase, fields: output.info(f"{phase} …"))
    read = f", {subset} of the data read and verified" if subset else " (structure and indexes; add --read-data-subset to read data)"
    output.ok(f"Repository {result['repository']} is consistent{read} ({result['seconds']:.1f}s)")


@repository_command.command("prune")
@guarded
def prune_command() -> None:
    """Apply REPOSITORY_KEEP_* to every database's sets, then reclaim the space (restic prune)."""
    from worker.repository.maintenance import prune

    settings = _configured()
    output.section("Prune Repository")
    result = prune(settings, f"cli-{uuid.uuid4()}", lambda phase, fields: output.info(f"{phase} …"))
    for database, forgotten in result["forgotten"].items():
        output.ok(f"{printable(database)}: forgot {len(forgotten)} set(s)")
    output.ok(f"Pruned {result['repository']} in {result['prune_seconds']:.1f}s")
