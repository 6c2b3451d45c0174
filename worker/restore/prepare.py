"""Prepare a restore without touching any database: resolve the file inside BACKUP_DIR, require its
`.meta`, check its SHA-256 and TOC, and bind a confirmation token to what was checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from worker.archive import catalogue
from worker.archive.meta import BackupMeta, MetaError, read_meta
from worker.archive.verification import verify_backup
from worker.errors import BackupError, VerificationFailed
from worker.pg.executors import Executor
from worker.restore.tokens import TokenBinding, TokenStore
from worker.settings import Settings


def resolve_backup_file(settings: Settings, file: str) -> Path:
    """The file, which must be a regular file inside BACKUP_DIR: no `..`, no absolute path elsewhere,
    no symlink (or symlinked folder) leading out."""
    folder = settings.backup_dir.resolve()
    if ".." in Path(file).parts:
        raise VerificationFailed(f"{file}: refused, '..' is not allowed in a backup path")
    candidate = catalogue.locate(folder, file)
    resolved = candidate.resolve()
    if resolved.parent != folder or candidate.is_symlink():
        raise VerificationFailed(f"{file}: refused, backups are restored only from inside BACKUP_DIR ({folder})")
    if not resolved.is_file():
        raise VerificationFailed(f"{file}: no such backup file in {folder}")
    return resolved


@dataclass
class PreparedRestore:
    path: Path
    meta: BackupMeta
    toc_entries: int
    sha256_verified: bool = True
    live_migration: str | None = None  # TMA Cloud's newest migration in the live database, if it has one

    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "database": self.meta.database,
            "timestamp": self.meta.timestamp,
            "size_bytes": self.path.stat().st_size,
            "sha256": self.meta.sha256,
            "sha256_verified": self.sha256_verified,
            "toc_entries": self.toc_entries,
            "tables": len(self.meta.row_counts),
            "rows": sum(self.meta.row_counts.values()),
            "row_counts": self.meta.row_counts,
            "tma_migration": self.meta.extra.get("tma_migration"),
            "live_tma_migration": self.live_migration,
        }


def prepare(settings: Settings, executor: Executor, file: str, checksum: bool = True) -> PreparedRestore:
    """Resolve, require .meta, check SHA-256 and TOC (which also proves pg_restore can read it).

    The restore task always checks the SHA-256 again under the lock, right before pg_restore reads the
    file. `checksum=False` leaves the check to it alone: for `restore FILE --confirm DB`, where no
    operator decision sits between the two passes, a second pass over the file would only cost time."""
    path = resolve_backup_file(settings, file)
    checked = verify_backup(path, settings, executor, checksum)
    return PreparedRestore(path, checked.meta, checked.toc_entries, checksum,
                           _live_migration(executor, checked.meta.database))


def _live_migration(executor: Executor, database: str) -> str | None:
    """TMA Cloud's newest migration in the live `database` (None when it has none or cannot be asked)."""
    from worker.backup.tma_version import newest_migration
    from worker.pg.database import connect

    try:
        with connect(executor.connect_kwargs(), database, autocommit=True) as connection:
            return newest_migration(connection)
    except (BackupError, psycopg.Error):
        return None


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 a backup's .meta records, or None when there is no readable .meta."""
    try:
        return read_meta(catalogue.meta_path(path)).sha256
    except MetaError:
        return None


def issue_token(store: TokenStore, prepared: PreparedRestore, host: str, ttl: int, hashed: str) -> TokenBinding:
    binding = TokenBinding(prepared.meta.database, str(prepared.path), prepared.meta.sha256, host)
    store.put(hashed, binding, ttl)
    return binding
