"""Verify a finished backup against its `.meta`: the sidecar must exist, the SHA-256 and the TOC must
match. Needs the client tools, never a database."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from worker.archive import catalogue
from worker.archive.meta import BackupMeta, MetaError, read_meta
from worker.errors import BackupError, VerificationFailed
from worker.pg.environment import tool_environment
from worker.pg.executors import Executor
from worker.progress import Progress, no_progress
from worker.settings import Settings

HASH_CHUNK = 4 * 1024 * 1024


def count_toc_entries(listing: str) -> int:
    """Real TOC entries of `pg_restore --list`: not the `;` header and comment lines."""
    return sum(1 for line in listing.splitlines() if line.strip() and not line.lstrip().startswith(";"))


def verify_archive(path: Path, executor: Executor, settings: Settings, allow_empty: bool = False) -> int:
    """`pg_restore --list` the archive; returns its TOC entry count or raises BackupError. No entries
    is an error unless the database really was empty (`allow_empty`: it had no tables at all)."""
    result = executor.list_archive(path, tool_environment(settings, "postgres"))
    if result.returncode != 0:
        raise BackupError(f"{path.name} is not a readable dump: {result.last_error_line()}")
    entries = count_toc_entries(result.stdout)
    if entries == 0 and not allow_empty:
        raise BackupError(f"{path.name} holds no TOC entries (empty or truncated dump)")
    return entries


def sha256_of(path: Path, progress: Progress = no_progress) -> str:
    digest = hashlib.sha256()
    done = 0
    progress("checksumming", {"bytes": 0})
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if done % (256 * HASH_CHUNK) < HASH_CHUNK:
                progress("checksumming", {"bytes": done})
    return digest.hexdigest()


@dataclass
class VerifiedBackup:
    path: Path
    meta: BackupMeta
    toc_entries: int


def verify_backup(path: Path, settings: Settings, executor: Executor, checksum: bool = True) -> VerifiedBackup:
    """`checksum=False` skips only the SHA-256 pass, for a caller that hashes the file itself later,
    before anything depends on its bytes."""
    if not path.is_file():
        raise VerificationFailed(f"{path}: no such backup file")
    sidecar = catalogue.meta_path(path)
    try:
        meta = read_meta(sidecar)
    except MetaError as error:
        raise VerificationFailed(
            f"{path.name}: its .meta is missing or unreadable ({error}); without it the checksum cannot be checked"
        ) from None
    if checksum:
        actual = sha256_of(path)
        if actual != meta.sha256:
            raise VerificationFailed(f"{path.name}: SHA-256 mismatch: expected {meta.sha256}, actual {actual}")
    entries = verify_archive(path, executor, settings, allow_empty=meta.toc_entries == 0 and not meta.row_counts)
    if entries != meta.toc_entries:
        raise VerificationFailed(f"{path.name}: {entries} TOC entries, but its .meta says {meta.toc_entries}")
    return VerifiedBackup(path, meta, entries)
