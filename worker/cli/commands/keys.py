"""`tma-backup keys init`: the private key, certificate and cert store of signed task messages."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from worker.cli import output
from worker.cli.common import guarded, printable
from worker.coordination import signing


@click.group("keys")
def keys_command() -> None:
    """Keys for signed task messages (README, "Signed task messages")."""


@keys_command.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("task-signing"), show_default=True,
              help="Where to create the key, the certificate and the cert store (created 0700 if missing).")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True,
              help="How long the certificate is valid; after that, messages signed with it are rejected.")
@guarded
def init_command(directory: Path, days: int) -> None:
    """Create an RSA 3072 private key (mode 0600), its self-signed certificate and a cert store folder
    holding that certificate, and print the three settings that turn signed task messages on. Never
    overwrites: exit 1 when any of them exists."""
    output.section("Task signing keys")
    files = signing.create_keys(directory, days, socket.gethostname())
    output.ok(f"Private key : {printable(str(files.key))} (mode 0600: whoever reads it can send any task)")
    output.ok(f"Certificate : {printable(str(files.cert))} (valid until {files.expires:%Y-%m-%d})")
    output.ok(f"Cert store  : {printable(str(files.store))} (holds {files.stored_cert.name})")
    output.info("Set these in .env or the environment of every worker, beat, Flower and CLI that shares the broker:")
    for line in files.settings_lines():
        click.echo(line)
