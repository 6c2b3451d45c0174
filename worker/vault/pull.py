"""The vault's pull: every set of the primary it lacks, copied with `restic copy` (both parts of a set
in one command, oldest first) and confirmed by its content: the copy's tree must be the primary's
(the vault has the primary's chunker parameters, so identical content has identical ids).

The primary is only read: `--no-lock`, so the vault's key on the primary needs read and list rights
and nothing else (no `locks/`), and nothing the vault runs can delete anything there. The vault's own
repository is held under our lock (`worker.repository.lock`, keyed by its address) like any other.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from worker.archive import catalogue
from worker.errors import BackupError
from worker.progress import Progress, no_progress
from worker.repository.access import primary_access, vault_access
from worker.repository.lock import using_repository
from worker.repository.restic import RepositoryError, RepositoryMissing, Restic
from worker.repository.sets import TOOL_TAG, RepositorySet, parse_snapshot
from worker.settings import Settings, SettingsError, ensure_backup_dir
from worker.vault import watch


def parts_of(restic: Restic) -> list[RepositorySet]:
    """Every part of every set this tool made in the repository (tag `tma-backup`)."""
    snapshots = restic.json(["snapshots", "--tag", TOOL_TAG]) or []
    return [parsed for snapshot in snapshots if (parsed := parse_snapshot(snapshot)) is not None]


def pull(settings: Settings, owner: str, progress: Progress = no_progress, now: datetime | None = None) -> dict[str, Any]:
    """Copy what the vault lacks; record what the primary showed; raise nothing for a finding (the
    result and the state carry them), RepositoryError when the primary or the vault cannot be used."""
    if settings.vault is None:
        raise BackupError("VAULT_REPOSITORY is not set: this host is no vault")
    started = time.monotonic()
    now = now or watch.now_utc()
    own_folder(settings)
    state = watch.State.load(settings)
    primary = Restic(settings, primary_access(settings))
    vault = Restic(settings, vault_access(settings), source=primary_access(settings))
    with using_repository(settings, owner, progress, address=settings.vault):
        try:
            progress("listing the primary", {})
            primary_parts = parts_of(primary)
        except RepositoryError as error:
            _failed(settings, state, "unreadable", f"the primary repository cannot be read: {error}", now)
            raise
        try:
            held = parts_of(vault)
        except RepositoryError as error:
            _failed(settings, state, "vault", f"the vault's own repository cannot be used: {error}", now)
            raise
        assessment = watch.assess(state, primary_parts, held, settings, now)
        state.problems = [{**problem, "since": catalogue.utc_timestamp(now)} for problem in assessment.problems]
        state.save(settings)  # the alarms are kept before anything else can fail
        copied = []
        for number, parts in enumerate(assessment.to_copy, 1):
            progress("copying", {"set": parts[0].timestamp, "number": number, "of": len(assessment.to_copy)})
            vault.run(["copy", "--no-lock", *[part.id for part in parts]])
            watch.record_copied(state, parts)
            state.save(settings)
            copied.append(parts)
        confirmed = _confirm(vault, copied) if copied else []
    state.last_pull = {"at": catalogue.utc_timestamp(now), "ok": True, "error": None, "copied": len(copied),
                       "primary_sets": len({part.key for part in primary_parts}),
                       "seconds": round(time.monotonic() - started, 3)}
    state.save(settings)
    return {
        "vault": vault.shown, "primary": primary.shown, "copied": confirmed,
        "primary_sets": state.last_pull["primary_sets"],
        "alarms": [alarm["message"] for alarm in assessment.new_alarms],
        "problems": [problem["message"] for problem in assessment.problems],
        "seconds": state.last_pull["seconds"],
    }


def own_folder(settings: Settings) -> None:
    """BACKUP_DIR holds the vault's state (and the lock's file when no Redis answers): there, writable."""
    try:
        ensure_backup_dir(settings)
    except SettingsError as error:
        raise BackupError(str(error)) from None


def _failed(settings: Settings, state: watch.State, kind: str, message: str, now: datetime) -> None:
    state.problems = [{"kind": kind, "message": message, "since": catalogue.utc_timestamp(now)}]
    state.last_pull = {"at": catalogue.utc_timestamp(now), "ok": False, "error": message}
    state.save(settings)


def _confirm(vault: Restic, copied: list[list[RepositorySet]]) -> list[dict[str, Any]]:
    """Each copied part must be in the vault with the primary's tree: the same content, byte for byte."""
    in_vault = {(part.key, part.part): part.tree for part in parts_of(vault)}
    confirmed = []
    for parts in copied:
        for part in parts:
            if not part.tree or in_vault.get((part.key, part.part)) != part.tree:
                raise RepositoryError(f"the copy of set {part.timestamp} ({part.part}) is not in the vault with the "
                                      "primary's content; the next pull copies it again")
        confirmed.append({"database": parts[0].database, "server": parts[0].server, "timestamp": parts[0].timestamp,
                          "parts": sorted(part.part for part in parts)})
    return confirmed


def init(settings: Settings) -> dict[str, Any]:
    """Create the vault's repository with the primary's chunker parameters (so copies deduplicate); never
    over an existing one."""
    if settings.vault is None:
        raise BackupError("VAULT_REPOSITORY is not set: this host is no vault")
    vault = Restic(settings, vault_access(settings), source=primary_access(settings))
    try:
        vault.run(["cat", "config"])
    except RepositoryMissing:
        pass
    else:
        raise RepositoryError(f"a repository already exists at {vault.shown}; nothing was changed")
    Restic(settings, primary_access(settings)).run(["cat", "config"])  # the primary must be readable first
    vault.run(["init", "--copy-chunker-params"])
    return {"vault": vault.shown, "primary": Restic(settings).shown}
