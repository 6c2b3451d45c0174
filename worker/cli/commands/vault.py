"""`tma-backup vault init | pull | list | acknowledge`: the vault (VAULT_REPOSITORY), on its own machine.

They run in this process on the vault's host (or in its worker container), under the vault
repository's lock like its workers' pull and upkeep. `tma-backup status` there reports the vault.
"""

from __future__ import annotations

import json
import uuid

import click

from worker.cli import output
from worker.cli.common import guarded, printable
from worker.errors import BackupError
from worker.settings import Settings, get_settings


def _vault() -> Settings:
    settings = get_settings()
    if settings.vault is None:
        raise BackupError("VAULT_REPOSITORY is not set: this host is no vault (README: the vault)")
    return settings


@click.group("vault")
def vault_command() -> None:
    """The vault: a repository on another machine that pulls the primary's sets and keeps them."""


@vault_command.command("init")
@guarded
def init_command() -> None:
    """Create the vault's repository at VAULT_REPOSITORY with the primary's chunker parameters."""
    from worker.vault.pull import init

    settings = _vault()
    output.section("Create Vault")
    created = init(settings)
    output.ok(f"Vault      : {created['vault']}, chunked as {created['primary']} (copies deduplicate)")
    output.info("Keep VAULT_REPOSITORY_PASSWORD on this machine and in a safe place, never on the TMA Cloud host.")


@vault_command.command("pull")
@guarded
def pull_command() -> None:
    """Copy every set of the primary the vault lacks now (beat does it at VAULT_SCHEDULE)."""
    from worker.vault.pull import pull

    settings = _vault()
    output.section("Vault Pull")
    result = pull(settings, f"cli-{uuid.uuid4()}", lambda phase, fields: output.info(f"{phase} …"))
    for item in result["copied"]:
        output.ok(f"Copied     : {printable(item['database'])} of {item['timestamp']} ({', '.join(item['parts'])})")
    output.ok(f"Pulled     : {len(result['copied'])} set(s) copied from {result['primary']} "
              f"({result['primary_sets']} there) in {result['seconds']:.1f}s")
    troubles = [*result["alarms"], *result["problems"]]
    for trouble in troubles:
        output.warn(trouble)
    if troubles:
        raise BackupError(troubles[0] if len(troubles) == 1 else f"{len(troubles)} problems: " + "; ".join(troubles))


@vault_command.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout, for scripts.")
@guarded
def list_command(as_json: bool) -> None:
    """The sets the vault holds, oldest first (as `tma-backup repository list` shows the primary's)."""
    from worker.repository.access import vault_access
    from worker.repository.restic import Restic
    from worker.repository.sets import merge_parts
    from worker.vault.pull import parts_of

    settings = _vault()
    restic = Restic(settings, vault_access(settings))
    sets = merge_parts(parts_of(restic))
    if as_json:
        for found in sets:
            click.echo(json.dumps(found.describe()))
        return
    output.section(f"Sets in the vault {restic.shown}")
    for found in sets:
        output.info(f"{found.short_id}  {printable(found.database)}  {printable(found.server or '-')}  {found.timestamp}"
                    + ("  +uploads" if found.uploads else ""))
    if not sets:
        output.info("No sets yet: run `tma-backup vault pull`.")


@vault_command.command("acknowledge")
@guarded
def acknowledge_command() -> None:
    """Clear the vault's alarms once you have looked into them (they stay until you do)."""
    from worker.vault.watch import acknowledge

    settings = _vault()
    output.section("Vault Alarms")
    cleared = acknowledge(settings)
    for alarm in cleared:
        output.ok(f"Cleared    : {alarm['since']}: {alarm['message']}")
    if not cleared:
        output.ok("No alarm to clear.")
