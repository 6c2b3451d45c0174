"""Errors an operator sees: one line that says what went wrong and, where there is one, the remedy."""

from __future__ import annotations


class BackupError(Exception):
    """A backup, verify or restore step failed. `str(error)` is the one line shown to the operator."""


class LockHeld(BackupError):
    """Another backup or restore of the same database holds its lock."""


class VerificationFailed(BackupError):
    """A file is not what its `.meta` says it is."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what one-line
    reports show of a library's multi-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
