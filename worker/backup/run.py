"""A backup run's record and its beginning and end: the lock and the name at the start, the summary
when it is over, and the removal of a failed run's files.

The run record travels between the chain's links (start → dump → verify → checksum → meta → offsite → prune):
a small JSON object of paths, ids, sizes and timings, never data or secrets. Like the task names it
is a wire format (links queued by one version are run by the next), so its keys are pinned by a test.
Celery tasks in `tasks/backup.py` are thin wrappers over these functions; the CLI's in-process mode
calls them in sequence (`worker.backup.inprocess`).
"""

import json
import os
import time
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from worker.archive import catalogue
from worker.archive.compression import parse_compression
from worker.archive.meta import human_size, write_atomically
from worker.coordination.locks import DatabaseLock
from worker.errors import BackupError
from worker.settings import Settings, SettingsError, check_database_name, ensure_backup_dir, folder_warning
from worker.uploads.config import check_set_inputs


# No `from __future__ import annotations` here: TypedDict reads NotRequired at run time only from real
# annotations, and the test that pins these keys reads them.
class Run(TypedDict):
    """What each link hands to the next. Set at the start:"""

    run_id: str
    database: str
    backup: str  # the final path of the `.dump` (or `.dump.zst`); the links work on its `.partial`
    timestamp: str
    host: str  # the worker host whose queue every link is routed to (where the files are)
    server: NotRequired[str]  # the database server's identity, as the run's lock key names it
    started_at: float
    warnings: list[str]
    # Set by the dump:
    server_version: NotRequired[str]
    server_id: NotRequired[str]  # `pg-<system_identifier>`: the server the dump was taken from, named by its set
    tma_migration: NotRequired[str]  # TMA Cloud's newest applied migration, read in the dump's snapshot
    change_fingerprint: NotRequired[str]  # what the database and uploads looked like (`worker.backup.unchanged`)
    pg_dump_version: NotRequired[str]
    archive_bytes: NotRequired[int]  # zstd-stream: the plain archive's size (room a restore needs)
    mode: NotRequired[str]
    mode_fields: NotRequired[dict[str, str]]
    tables: NotRequired[int]
    dump_seconds: NotRequired[float]
    # With uploads in the set (`worker.uploads`): the uploads part and the cross-check's counts.
    uploads: NotRequired[dict[str, Any]]
    # By verify, checksum, meta and prune:
    toc_entries: NotRequired[int]
    sha256: NotRequired[str]
    size_bytes: NotRequired[int]
    duration_seconds: NotRequired[float]
    complete: NotRequired[bool]
    # By offsite (only with BACKUP_REPOSITORY): the set id, bytes added, seconds, what else was sent.
    offsite: NotRequired[dict[str, Any]]
    deleted: NotRequired[list[str]]


class Summary(TypedDict):
    """The chain's final result, as Flower and the result backend show it."""

    backup: str
    database: str
    host: str
    size: str
    size_bytes: int
    toc_entries: int
    sha256: str
    tables: int
    duration_seconds: float
    deleted: list[str]
    mode: str
    offsite: NotRequired[dict[str, Any]]  # with BACKUP_REPOSITORY: the set, bytes added, seconds
    uploads: NotRequired[dict[str, Any]]  # with uploads in the set: the uploads part and the cross-check
    warnings: NotRequired[list[str]]  # what the operator should know of a run that succeeded


def start_run(settings: Settings, database: str, run_id: str, lock: DatabaseLock, server: str) -> Run:
    """Take the database's lock (owner: the run id; `server`: the identity its key names) and choose
    the backup's name."""
    try:
        check_database_name(database)  # it names files: `../x` must never write outside BACKUP_DIR
    except ValueError as error:
        raise BackupError(f"database {database!r}: {error}") from None
    try:
        directory = ensure_backup_dir(settings)
    except SettingsError as error:
        raise BackupError(str(error)) from None
    lock.acquire()
    try:
        dump = catalogue.new_backup_path(directory, database, parse_compression(settings.BACKUP_COMPRESSION).suffix)
    except BaseException:
        lock.release()
        raise
    warning = folder_warning(directory)
    try:
        set_warnings = check_set_inputs(settings, database)
    except BaseException:
        lock.release()
        raise
    return {
        "run_id": run_id,
        "database": database,
        "backup": str(dump),
        "timestamp": catalogue.timestamp_of(dump, database),
        "host": settings.WORKER_HOST,
        "server": server,
        "started_at": time.time(),
        "warnings": ([warning] if warning else []) + set_warnings,
    }


def check_run(run: Any, settings: Settings) -> Run:
    """A run record that arrived in a message, checked before any link acts on it (docs/threat-model.md):
    a valid database name, a backup path inside this host's BACKUP_DIR named `<database>_<timestamp>.dump`
    (or `.dump.zst`) for its own database and timestamp, and this host's name. Raises BackupError."""
    if not isinstance(run, dict) or not all(isinstance(run.get(key), str) for key in ("run_id", "database", "backup",
                                                                                     "timestamp", "host")):
        raise BackupError("refused a chain link whose run record is malformed")
    try:
        check_database_name(run["database"])
        catalogue.parse_timestamp(run["timestamp"])
    except ValueError as error:
        raise BackupError(f"refused a chain link for database {run['database']!r}: {error}") from None
    backup = Path(run["backup"])
    names = {catalogue.backup_name(run["database"], run["timestamp"], suffix)
             for suffix in (catalogue.DUMP_SUFFIX, catalogue.ZST_DUMP_SUFFIX)}
    if not backup.is_absolute() or backup.parent != settings.backup_dir or backup.name not in names:
        raise BackupError(f"refused a chain link: its backup {run['backup']!r} is not a backup of {run['database']!r} "
                          f"in this host's BACKUP_DIR ({settings.backup_dir})")
    if run["host"] != settings.WORKER_HOST:
        raise BackupError(f"refused a chain link of host {run['host']!r} on host {settings.WORKER_HOST!r}")
    return cast(Run, run)


def write_counts(path: Path, counts: dict[str, int]) -> None:
    write_atomically(path, json.dumps(counts))


def read_counts(path: Path) -> dict[str, int]:
    return {str(key): int(value) for key, value in json.loads(path.read_text()).items()}


def abandon_files(run: Run) -> list[str]:
    """Remove what this run wrote, short of a complete backup. Never touches other backups. Best effort:
    a file that cannot be removed (a read-only file system) stays for the next run's prune, and the
    caller still goes on to release the lock."""
    backup = Path(run["backup"])
    doomed = catalogue.run_files(backup)
    if not os.path.lexists(backup):
        doomed += [catalogue.meta_path(backup), catalogue.env_path(backup)]
    removed = []
    for path in doomed:
        try:
            removed += [found.name for found in catalogue.delete_files([path])]
        except OSError:
            pass
    return removed


def summary(run: Run) -> Summary:
    """The chain's final result: small and readable in Flower and the result backend."""
    result: Summary = {
        "backup": run["backup"],
        "database": run["database"],
        "host": run["host"],
        "size": human_size(run["size_bytes"]),
        "size_bytes": run["size_bytes"],
        "toc_entries": run["toc_entries"],
        "sha256": run["sha256"],
        "tables": run["tables"],
        "duration_seconds": run["duration_seconds"],
        "deleted": run.get("deleted", []),
        "mode": run["mode"],
    }
    if "offsite" in run:
        result["offsite"] = run["offsite"]
    if "uploads" in run:
        result["uploads"] = run["uploads"]
    if run["warnings"]:
        result["warnings"] = run["warnings"]
    return result
