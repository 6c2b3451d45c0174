"""The uploads part of a set: UPLOAD_DIR stored by restic as its own snapshot, right after pg_dump.

The snapshot's tree holds the folder's content at its root (restic runs in UPLOAD_DIR on `.`), so
`restic restore ID --target DIR` gives exactly the uploads. Only TMA Cloud's entries: the tool's own
(`.tma-*`: staging folders, journals, files set aside by a restore) and the file system's `lost+found`
never enter a set (`worker.uploads.swap.capture_excludes`). It names the previous uploads part of the
same database as its parent: an unchanged file (same size, mtime and inode) is not read again. TMA's
blobs are encrypted and incompressible: restic's compression is off for them. A file restic cannot
read is named, never skipped in silence.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import BackupError
from worker.progress import Progress, no_progress
from worker.repository import sets
from worker.repository.lock import using_repository
from worker.repository.restic import Restic, explain
from worker.repository.sets import TOOL_TAG, database_tag, list_files, of_server, parse_snapshot, set_tags, set_time
from worker.settings import Settings
from worker.uploads.swap import capture_excludes

UPLOADS_PART = f"part:{sets.UPLOADS_PART}"
PARTIAL_SNAPSHOT = 3  # restic's exit code: the snapshot was written, some files could not be read


@dataclass
class UploadsCapture:
    id: str
    files: dict[str, int]  # path relative to UPLOAD_DIR → size, regular files only
    links: list[str]  # symbolic links: stored as links, never followed
    unreadable: list[str]  # named in the run and the .meta; each referenced one counts as missing
    bytes_added: int
    total_bytes: int
    seconds: float
    errors: list[str] = field(default_factory=list)


def check_upload_dir(folder: Path | None) -> Path:
    if folder is None:
        raise BackupError("UPLOAD_DIR is not set: name TMA Cloud's uploads folder (STORAGE_DRIVER=local)")
    try:
        mode = folder.stat().st_mode
    except OSError as error:
        raise BackupError(f"UPLOAD_DIR {folder}: {error.strerror}; it must be TMA Cloud's uploads folder") from None
    if not stat.S_ISDIR(mode):
        raise BackupError(f"UPLOAD_DIR {folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise BackupError(f"UPLOAD_DIR {folder} cannot be read by this process")
    return folder


def latest_uploads_part(restic: Restic, database: str, server: str | None) -> str | None:
    """The newest uploads part of this server's sets of `database` (the next capture's parent)."""
    snapshots = restic.json(["snapshots", "--tag", f"{TOOL_TAG},{database_tag(database)},{UPLOADS_PART}"]) or []
    parts = [part for snapshot in snapshots if (part := parse_snapshot(snapshot)) is not None]
    found = sorted(of_server(parts, server), key=lambda part: part.timestamp)
    return found[-1].id if found else None


def capture(settings: Settings, folder: Path, database: str, server: str | None, timestamp: str, run_id: str,
            progress: Progress = no_progress, tma_folder: bool = True) -> UploadsCapture:
    """Store `folder` as the uploads part of the set `database`/`timestamp` of `server`. Raises
    RepositoryError or BackupError; a file that cannot be read is reported in the result (restic writes
    the snapshot). `tma_folder`: `folder` is UPLOAD_DIR, whose entries of the tool's own are left out
    (not the S3 mirror, whose manifest is the set's own file)."""
    with using_repository(settings, run_id, progress):
        return _capture(settings, folder, database, server, timestamp, run_id, progress, tma_folder)


def _capture(settings: Settings, folder: Path, database: str, server: str | None, timestamp: str, run_id: str,
             progress: Progress, tma_folder: bool) -> UploadsCapture:
    started = time.monotonic()
    restic = Restic(settings)
    parent = latest_uploads_part(restic, database, server)
    summary: dict[str, Any] = {}

    def on_line(message: dict[str, Any]) -> None:
        if message.get("message_type") == "summary":
            summary.update(message)
        elif message.get("message_type") == "status":
            progress("capturing uploads", {"bytes_done": int(message.get("bytes_done", 0)),
                                           "total_bytes": int(message.get("total_bytes", 0))})

    moment = set_time(timestamp)
    excludes = [argument for pattern in capture_excludes(folder) for argument in ("--exclude", pattern)] \
        if tma_folder else []
    outcome = restic.run(
        ["backup", "--json", "--compression", "off", "--host", settings.WORKER_HOST, "--time", moment,
         "--tag", ",".join([*set_tags(database, timestamp, run_id, server), UPLOADS_PART]), *excludes,
         *(["--parent", parent] if parent else []), "."],
        cwd=folder, on_json=on_line, check=False,
    )
    if outcome.returncode not in (0, PARTIAL_SNAPSHOT) or not summary.get("snapshot_id"):
        raise explain(outcome.stderr, restic.address)
    unreadable = sorted({_relative(item, folder) for item in _error_items(outcome.stdout + outcome.stderr)})
    listing = list_files(restic, str(summary["snapshot_id"]))
    return UploadsCapture(
        id=str(summary["snapshot_id"]), files=listing.files, links=listing.links, unreadable=unreadable,
        bytes_added=int(summary.get("data_added", 0)), total_bytes=int(summary.get("total_bytes_processed", 0)),
        seconds=time.monotonic() - started,
    )


def _error_items(text: str) -> list[str]:
    items = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("message_type") == "error" and message.get("item"):
            items.append(str(message["item"]))
    return items


def _relative(item: str, folder: Path) -> str:
    path = Path(item)
    try:
        return path.relative_to(folder).as_posix() if path.is_absolute() else path.as_posix().removeprefix("./")
    except ValueError:
        return item


def capture_for_run(run: Any, settings: Settings, progress: Progress = no_progress) -> dict[str, Any]:
    """The dump link's capture, right after pg_dump: the uploads part, then the cross-check against the
    references read in the dump's snapshot. Returns the run's small `uploads` record. A repository that
    cannot be reached is recorded (the offsite link then fails the run with it), never a lost dump."""
    from worker.repository.restic import RepositoryError
    from worker.uploads.crosscheck import cross_check, key_fingerprint
    from worker.uploads.references import load, references_path
    from worker.uploads.s3_errors import SourceError
    from worker.uploads.s3_mirror import MANIFEST_NAME, sync_mirror

    backup = Path(run["backup"])
    references = load(references_path(backup))
    record: dict[str, Any] = {}
    if settings.FILE_ENCRYPTION_KEY is not None:
        record["key_sha256"] = key_fingerprint(settings.FILE_ENCRYPTION_KEY.get_secret_value())
    progress("capturing uploads", {})
    mirror = None
    try:
        if settings.STORAGE_DRIVER == "s3":  # TMA's bucket, mirrored into BACKUP_DIR: the mirror is captured
            mirror = sync_mirror(settings, run["database"], progress)
            record.update(mirror.fields())
            run["warnings"].extend(mirror.warnings())
            folder = mirror.folder
        else:
            folder = check_upload_dir(settings.UPLOAD_DIR)
        captured = capture(settings, folder, run["database"], run.get("server_id"), run["timestamp"], run["run_id"],
                           progress, tma_folder=mirror is None)
    except (RepositoryError, SourceError) as error:  # the set then lacks its uploads: all count as missing
        checked = cross_check(references, {})
        record.update({"error": str(error), **checked.fields()})
        run["warnings"].append(f"uploads not captured: {error}")
        return record
    files, unreadable = captured.files, captured.unreadable
    if mirror is not None:  # the manifest is the set's own file, no upload; keys the mirror could not fetch
        files = {path: size for path, size in files.items() if path != MANIFEST_NAME}
        unreadable = sorted({*unreadable, *mirror.unreadable})
    checked = cross_check(references, files, captured.links, unreadable)
    record.update({
        "part": captured.id[:8],
        "files": len(files),
        "bytes": sum(files.values()),
        "bytes_added": captured.bytes_added,
        "seconds": round(captured.seconds, 3),
        "unreadable": len(unreadable),
        "unreadable_names": unreadable[:20],
        **checked.fields(),
    })
    for problem, names in (("cannot be read", unreadable), ("are referenced but missing from the set", checked.missing),
                           ("are references leading outside UPLOAD_DIR (never read)", checked.escaping)):
        if names:
            shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
            run["warnings"].append(f"{len(names)} upload(s) {problem}: {shown}")
    progress("captured uploads", {key: record[key] for key in ("files", "bytes_added", "missing", "unreferenced")})
    return record
