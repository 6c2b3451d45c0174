"""Restoring a set's uploads: fetch its uploads part beside the live files (inside UPLOAD_DIR), check
them against the restored database's references before anything is swapped, then swap them together
with the database (`worker.uploads.swap`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.archive.meta import BackupMeta
from worker.errors import BackupError
from worker.pg.database import connect
from worker.progress import Progress, no_progress
from worker.repository.lock import using_repository
from worker.repository.restic import Restic
from worker.repository.sets import TOOL_TAG, UPLOADS_PART, database_tag, parse_snapshot
from worker.settings import Settings
from worker.uploads import swap as uploads_swap
from worker.uploads.capture import check_upload_dir
from worker.uploads.crosscheck import cross_check, key_fingerprint
from worker.uploads.references import read_references
from worker.uploads.s3_mirror import MANIFEST_NAME


@dataclass
class UploadsPlan:
    folder: Path
    part: str  # the uploads part's id: as the .meta records it, then as the repository holds it
    staged: Path
    bytes: int
    missing_at_backup: int
    key_sha256: str | None
    database: str  # the set's, with its backup timestamp and server: how its parts are found by their tags
    timestamp: str
    server: str | None

    def describe(self, settings: Settings) -> dict[str, Any]:
        current = (key_fingerprint(settings.FILE_ENCRYPTION_KEY.get_secret_value())
                   if settings.FILE_ENCRYPTION_KEY is not None else None)
        return {
            "upload_dir": str(self.folder),
            "part": self.part,
            "bytes": self.bytes,
            "missing_at_backup": self.missing_at_backup,
            "key_sha256": self.key_sha256,
            "key_matches": None if self.key_sha256 is None or current is None else self.key_sha256 == current,
        }


def plan(settings: Settings, meta: BackupMeta, run: str, live: str) -> UploadsPlan:
    """What restoring this backup's uploads into `live`'s UPLOAD_DIR takes; refuses (one line) when it
    cannot be done."""
    if live != settings.DB_NAME:
        raise BackupError(f"UPLOAD_DIR holds the uploads of DB_NAME ({settings.DB_NAME!r}), not of {live!r}: "
                          "restore this database without --with-uploads/--uploads-only")
    if not settings.repository:
        raise BackupError("--with-uploads needs BACKUP_REPOSITORY: the uploads live in the repository's sets")
    if settings.STORAGE_DRIVER == "s3":
        raise BackupError(
            "restoring uploads into TMA Cloud's bucket (STORAGE_DRIVER=s3) is not supported yet: restore the database "
            "alone, then copy the set's uploads part back with `restic restore <part> --target DIR` and your S3 tool")
    part = meta.extra.get("uploads_part")
    if not part:
        raise BackupError(f"the backup of {meta.timestamp} has no uploads in its set (it was made without UPLOAD_DIR "
                          "or its capture failed); restore the database alone")
    folder = check_upload_dir(settings.UPLOAD_DIR)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackupError(f"UPLOAD_DIR {folder} is not writable by this process: a restore moves files inside it; "
                          "nothing was touched")
    return UploadsPlan(
        folder=folder, part=part, staged=uploads_swap.staged_folder(folder, run),
        bytes=int(meta.extra.get("uploads_bytes", "0") or 0),
        missing_at_backup=int(meta.extra.get("uploads_missing", "0") or 0),
        key_sha256=meta.extra.get("file_encryption_key_sha256"),
        database=meta.database, timestamp=meta.timestamp, server=meta.extra.get("server_id"),
    )


def stage(settings: Settings, uploads: UploadsPlan, run: str, progress: Progress = no_progress) -> dict[str, int]:
    """Fetch the uploads part into the staging folder inside UPLOAD_DIR (restic checks every blob's
    hash as it restores). Returns the staged files. Nothing live is touched; a failure removes the
    staging folder."""
    uploads_swap.check_room(uploads.folder, uploads.bytes)
    progress("fetching uploads", {"bytes": uploads.bytes})
    started = time.monotonic()
    try:
        with using_repository(settings, run, progress):
            restic = Restic(settings)
            uploads.part = uploads_part_in(restic, uploads)
            restic.run(["restore", uploads.part, "--target", str(uploads.staged)])
        staged = uploads_swap.files_of(uploads.staged)
    except BaseException:
        uploads_swap.drop_staged(uploads.folder, uploads.staged)
        raise
    progress("fetched uploads", {"files": len(staged), "seconds": round(time.monotonic() - started, 3)})
    return staged


def uploads_part_in(restic: Restic, uploads: UploadsPlan) -> str:
    """The set's uploads part in this repository, found by the set's tags: the id the `.meta` recorded is
    the primary's, and a vault's copy of it has an id of its own."""
    tags = f"{TOOL_TAG},{database_tag(uploads.database)},at:{uploads.timestamp},part:{UPLOADS_PART}"
    found = [part for snapshot in restic.json(["snapshots", "--tag", tags]) or []
             if (part := parse_snapshot(snapshot)) is not None and uploads.server in (None, part.server)]
    recorded = [part.id for part in found if part.id.startswith(uploads.part)]
    if recorded:
        return recorded[0]
    return found[0].id if len(found) == 1 else uploads.part  # none or several: the id the .meta recorded


def check_staged(settings: Settings, connect_kwargs: dict[str, Any], database: str, uploads: UploadsPlan,
                 staged: dict[str, int], strict: bool = True) -> dict[str, Any]:
    """`database`'s references against the staged files. `strict` (the restored copy, before the swap):
    a reference the set held at backup time but the staged files lack is a failed restore (nothing is
    swapped); the ones already missing at backup time are reported. Not strict (`--uploads-only`,
    against the live database): references the set cannot have (uploads newer than the set) are
    reported, never a reason to keep the others from coming back."""
    with connect(connect_kwargs, database, autocommit=True) as connection:
        references = read_references(connection, settings.UPLOADS_REFERENCES_QUERY)
    staged = {path: size for path, size in staged.items() if path != MANIFEST_NAME}
    checked = cross_check(references, staged)
    if strict and len(checked.missing) > uploads.missing_at_backup:
        shown = ", ".join(checked.missing[:5])
        raise BackupError(
            f"{len(checked.missing)} upload(s) the restored database references are not among the restored files "
            f"(the set lacked {uploads.missing_at_backup} at backup time): {shown}; nothing was swapped")
    return checked.fields()
