"""The CLI's command table (worker/cli/main.py imports each command's module only when it runs): every
name gives the command of that name, `--help` lists them all, and a command's run does not import what
only the others need."""

from __future__ import annotations

import subprocess
import sys

import click

from tests import services
from worker.cli.main import COMMANDS, cli


def test_every_name_gives_the_command_of_that_name() -> None:
    context = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(context, name)
        assert isinstance(command, click.Command) and command.name == name, name
    assert cli.get_command(context, "no-such-command") is None
    assert cli.list_commands(context) == sorted(COMMANDS)


def test_help_lists_every_command_and_a_local_command_does_not_import_celery() -> None:
    listed = subprocess.run([services.TMA_BACKUP, "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    commands = listed.stdout.split("Commands:", 1)[1].split()
    assert all(name in commands for name in COMMANDS), listed.stdout
    probe = ("import sys; from worker.cli.main import cli; cli.get_command(None, 'list'); "
             "print(sorted(m for m in ('celery', 'psycopg', 'redis') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              cwd=services.REPO)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr
