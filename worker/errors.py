"""Errors an operator sees: one line that says what went wrong and, where there is one, the remedy."""

from __future__ import annotations


class BackupError(Exception):
    """A backup, verify or restore step failed. `str(error)` is the one line shown to the operator."""


class LockHeld(BackupError):
    """Another backup or restore of the same database holds its lock."""


class VerificationFailed(BackupError):
    """A file is not what its `.meta` says it is."""


class NothingChanged(Exception):
    """A run asked to take a set only if something changed found nothing changed since the last set
    (`worker.backup.unchanged`): not a failure. `record` is that set's record, with the check's time."""

    def __init__(self, record: dict[str, object]) -> None:
        super().__init__(f"nothing changed since the set of {record.get('timestamp')}: no set made")
        self.record = record


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what one-line
    reports show of a library's multi-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
