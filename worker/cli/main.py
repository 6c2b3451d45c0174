"""`tma-backup`: the command group. Exit codes: 0 success, 1 failure, 2 bad usage or settings. Errors
are one `[ERROR]` line; tracebacks never reach the operator."""

from __future__ import annotations

import click

from worker.cli.commands.backup import backup_command
from worker.cli.commands.drill import drill_command
from worker.cli.commands.inspect import list_command, status_command, verify_command
from worker.cli.commands.keys import keys_command
from worker.cli.commands.notify import notify_command, warn_on_terminal
from worker.cli.commands.repair import repair_command
from worker.cli.commands.repository import repository_command
from worker.cli.commands.restore import restore_command, rollback_command
from worker.cli.commands.vault import vault_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Back up and restore PostgreSQL through Celery workers (see README)."""


for command in (backup_command, verify_command, list_command, status_command, restore_command, rollback_command,
                drill_command, repair_command, keys_command, repository_command, vault_command, notify_command):
    cli.add_command(command)


def main() -> None:
    warn_on_terminal()  # an undeliverable notification is a [WARN] line, never a failure
    cli()


if __name__ == "__main__":
    main()
