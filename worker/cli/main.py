"""`tma-backup`: the command group. Exit codes: 0 success, 1 failure, 2 bad usage or settings. Errors
are one `[ERROR]` line; tracebacks never reach the operator."""

from __future__ import annotations

import atexit
import gc
import importlib

import click

from worker.cli.commands.notify import warn_on_terminal

# Each command's module is imported when that command runs (or when `--help` lists them all): a run pays
# for its own command's imports only, which every scheduled or scripted run feels (docs/frequent-sets.md).
COMMANDS = {
    "backup": ("backup", "backup_command"),
    "verify": ("inspect", "verify_command"),
    "list": ("inspect", "list_command"),
    "status": ("inspect", "status_command"),
    "restore": ("restore", "restore_command"),
    "rollback": ("restore", "rollback_command"),
    "drill": ("drill", "drill_command"),
    "repair": ("repair", "repair_command"),
    "keys": ("keys", "keys_command"),
    "repository": ("repository", "repository_command"),
    "vault": ("vault", "vault_command"),
    "notify": ("notify", "notify_command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(f"worker.cli.commands.{module}"), attribute)
        gc.freeze()  # what the imports built lives as long as the process: no collection need scan it again
        return command  # tests/test_cli_commands.py: each name gives the command of that name


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Back up and restore PostgreSQL through Celery workers (see README)."""


def main() -> None:
    # Registered first, so it runs last: the interpreter's collections at exit then skip every object there
    # is, instead of scanning them all once more (~0.1 s of a core per command; files are still closed).
    atexit.register(gc.freeze)
    warn_on_terminal()  # an undeliverable notification is a [WARN] line, never a failure
    cli()


if __name__ == "__main__":
    main()
