"""The seed's output style on stderr: `[INFO]`, `[OK]`, `[WARN]`, `[ERROR]` and `── Title ──` sections.
Colour only on a terminal (Rich turns it off by itself otherwise)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)
# Without a terminal Rich assumes 80 columns and would cut file names in tables: be wide instead.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)

_STYLES = {"INFO": "cyan", "OK": "green", "WARN": "yellow", "ERROR": "bold red"}


def _line(level: str, message: str) -> None:
    label = f"[{level}]".ljust(7)
    console.print(f"[{_STYLES[level]}]{escape(label)}[/] {escape(message)}")


def info(message: str) -> None:
    _line("INFO", message)


def ok(message: str) -> None:
    _line("OK", message)


def warn(message: str) -> None:
    _line("WARN", message)


def error(message: str) -> None:
    _line("ERROR", " ".join(message.split()) if "\n" in message else message)


def section(title: str) -> None:
    console.print(f"\n[bold]── {escape(title)} ──[/]")
