"""The repository's sets of one database, as the prune link last listed them, handed to the next run's
offsite link on the same host, which then need not list the repository again before sending (every
restic command pays about half a second of key derivation, a tenth of sending a 500 MB dump).

It is a one-shot note in BACKUP_DIR, taken (deleted) by the offsite link before it sends anything, and
trusted only when all it leaves to send is the run's own backup. Anything else (no note, a note of
another repository, an older backup the note says is missing, a link that retries) lists the
repository itself, as the first run does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from worker.settings import Settings

PREFIX = ".offsite-listing-"


def _note(settings: Settings, database: str, server: str | None) -> Path:
    key = hashlib.sha256(f"{settings.repository}\0{database}\0{server}".encode()).hexdigest()[:24]
    return settings.backup_dir / f"{PREFIX}{key}.json"


def _fingerprint(settings: Settings) -> str:
    return hashlib.sha256((settings.repository or "").encode()).hexdigest()


def hand_over(settings: Settings, database: str, server: str | None, timestamps: set[str]) -> None:
    """Leave the timestamps of the database's sets of this server (just listed, under the repository's
    lock) for the next run. A note that cannot be written is no loss: the next run lists the repository."""
    note = _note(settings, database, server)
    partial = note.with_name(note.name + ".partial")
    body = {"repository": _fingerprint(settings), "database": database, "timestamps": sorted(timestamps)}
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as target:
            json.dump(body, target)
        os.replace(partial, note)
    except OSError:
        partial.unlink(missing_ok=True)


def take(settings: Settings, database: str, server: str | None) -> set[str] | None:
    """The timestamps handed over for this database, server and repository, deleting the note; None when
    there is none (or it is unreadable, or of another repository or database)."""
    note = _note(settings, database, server)
    try:
        text = note.read_text()
        note.unlink()
        body = json.loads(text)
    except (OSError, ValueError):
        return None
    if (not isinstance(body, dict) or body.get("repository") != _fingerprint(settings)
            or body.get("database") != database or not isinstance(body.get("timestamps"), list)):
        return None
    return {str(timestamp) for timestamp in body["timestamps"]}
