"""Verify a finished backup against its `.meta`: the sidecar must exist, the SHA-256 and the TOC must
match. Needs the client tools, never a database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker import catalogue
from worker.backup import sha256_of, verify_archive
from worker.errors import VerificationFailed
from worker.executors import Executor
from worker.meta import BackupMeta, MetaError, read_meta
from worker.settings import Settings


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
