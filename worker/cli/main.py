"""`tma-backup`: the command group. Exit codes: 0 success, 1 failure, 2 bad usage or settings. Errors
are one `[ERROR]` line; tracebacks never reach the operator."""

from __future__ import annotations

import atexit
import gc
import importlib

import click

from worker.collector import imports_done

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
        imports_done()
        return command  # tests/test_cli_commands.py: each name gives the command of that name


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Back up and restore PostgreSQL through Celery workers (see README)."""


def main() -> None:
    # The collector is off until the command's module is imported (`worker.collector`: ~0.1 s of a core per
    # command), and frozen again as the last thing at exit (registered first, so it runs last), so the
    # interpreter's final collections skip it too.
    gc.disable()
    atexit.register(gc.freeze)
    try:
        from worker.cli.commands.notify import warn_on_terminal

        warn_on_terminal()  # an undeliverable notification is a [WARN] line, never a failure
        cli()
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
