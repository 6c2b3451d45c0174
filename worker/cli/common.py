"""Helpers every command uses: one error line and the right exit code, `--database`, file names shown
safely, the phase messages and durations of a long operation."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from worker.cli import output
from worker.errors import BackupError
from worker.progress import Progress
from worker.settings import Settings, SettingsError, check_database_name

F = TypeVar("F", bound=Callable[..., Any])

# The phases of a restore and of a drill, as the operator reads them.
RESTORE_PHASES = {
    "checking": "Checking the backup (SHA-256, TOC, row counts) …",
    "restoring": "Restoring into a scratch database (pg_restore --exit-on-error) …",
    "counting": "ANALYZE and exact row counts, compared with the backup's .meta …",
    "swapping": "Swapping the restored copy in by rename …",
    "dropping": "Dropping and recreating the database (in-place mode) …",
}


def guarded(command: F) -> F:
    """One line and the right exit code for every expected failure."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SettingsError as error:
            output.error(str(error))
            sys.exit(2)
        except BackupError as error:
            output.error(str(error))
            sys.exit(1)
        except OSError as error:  # the file system said no (permissions, a full disk, a name too long)
            where = f"{error.filename}: " if error.filename else ""
            output.error(f"{where}{error.strerror or error}")
            sys.exit(1)
        except KeyboardInterrupt:
            output.error("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]  # functools.wraps loses F's signature


def database_option(given: str | None, settings: Settings) -> str:
    """`--database`, checked like DB_NAME (it names files in BACKUP_DIR), or DB_NAME."""
    if given is None:
        return settings.DB_NAME
    try:
        return check_database_name(given)
    except ValueError as error:
        raise SettingsError(f"--database: {error} (got {given!r})") from None


def printable(name: str) -> str:
    """A file name as one line of plain text: control characters (a newline could fake a row) escaped."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)


def phase_printer(messages: dict[str, str]) -> Progress:
    """A progress callback that prints each known phase's message once, when the phase starts."""
    shown: set[str] = set()

    def show(phase: str, fields: dict[str, Any]) -> None:
        if phase in messages and phase not in shown:
            shown.add(phase)
            output.info(messages[phase])

    return show


def duration(result: dict[str, Any]) -> str:
    """`13.3s (checking 0.5s, restoring 12.1s, …)`: the total, and each phase's share when reported."""
    phases = result.get("phase_seconds") or {}
    shares = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in phases.items())
    return f"{result['duration_seconds']:.1f}s" + (f" ({shares})" if shares else "")

