"""The links after the dump: verify → checksum → meta (publish) → offsite (with a repository) → prune."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from worker.archive import catalogue
from worker.archive.compression import parse_compression
from worker.archive.meta import BackupMeta, fsync_dir, write_atomically
from worker.archive.verification import sha256_of, verify_archive
from worker.backup.run import Run, abandon_files, read_counts
from worker.backup.unchanged import record_set
from worker.coordination.locks import DatabaseLock, kept_alive, renewal_interval
from worker.errors import BackupError
from worker.faults import crash_point
from worker.pg.executors import Executor
from worker.progress import Progress, no_progress
from worker.settings import Settings
from worker.uploads.references import references_path


def verify(run: Run, settings: Settings, executor: Executor, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    lock.confirm()
    partial = catalogue.partial_path(Path(run["backup"]))
    progress("verifying", {})
    try:
        with kept_alive(lock, renewal_interval(settings)) as lock_lost:
            empty_database = not read_counts(catalogue.counts_path(Path(run["backup"])))
            run["toc_entries"] = verify_archive(partial, executor, settings, allow_empty=empty_database)
            if lock_lost.is_set():
                lock.confirm()
    except BaseException:
        abandon_files(run)
        raise
    return run


def checksum(run: Run, settings: Settings, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    lock.confirm()
    partial = catalogue.partial_path(Path(run["backup"]))
    try:
        with kept_alive(lock, renewal_interval(settings)) as lock_lost:  # a large file takes a while
            run["sha256"] = sha256_of(partial, progress)
            run["size_bytes"] = partial.stat().st_size
            if lock_lost.is_set():
                lock.confirm()
    except BaseException as error:
        abandon_files(run)
        if isinstance(error, OSError):
            raise BackupError(f"cannot read {partial.name}: {error.strerror}") from None
        raise
    return run


def write_meta(run: Run, settings: Settings, lock: DatabaseLock, task_id: str | None = None) -> Run:
    """Write `<name>.dump.meta` atomically, then rename `.partial` → `.dump`: the backup is complete."""
    lock.confirm()  # the last check: this run still owns the database, so it may publish
    backup = Path(run["backup"])
    partial = catalogue.partial_path(backup)
    try:
        if partial.stat().st_size != run["size_bytes"]:
            raise BackupError(f"{partial.name} changed size after its checksum; not publishing it")
        counts = read_counts(catalogue.counts_path(backup))
        extra = {
            "file_size_bytes": str(run["size_bytes"]),
            "pg_dump_version": run["pg_dump_version"],
            "server_version": run["server_version"],
            **({"server_id": run["server_id"]} if run.get("server_id") else {}),
            **({"tma_migration": run["tma_migration"]} if run.get("tma_migration") else {}),
            **run.get("mode_fields", {}),
            **({"archive_bytes": str(run["archive_bytes"])} if run.get("archive_bytes") else {}),
            "worker_host": run["host"],
            "machine": socket.gethostname(),
            "run_id": run["run_id"],
            "task_id": task_id or run["run_id"],
            "tool": "tma-backup",
            **_uploads_fields(run),
        }
        meta = BackupMeta(
            timestamp=run["timestamp"],
            database=run["database"],
            user=settings.DB_USER,
            mode=run["mode"],
            compression=parse_compression(settings.BACKUP_COMPRESSION).label.removeprefix("--compress="),
            toc_entries=run["toc_entries"],
            file_size_bytes=run["size_bytes"],
            duration_seconds=time.time() - run["started_at"],
            sha256=run["sha256"],
            row_counts=counts,
            extra=extra,
        )
        write_atomically(catalogue.meta_path(backup), meta.render())
        os.chmod(partial, 0o600)
        os.replace(partial, backup)
        fsync_dir(backup.parent)
        catalogue.counts_path(backup).unlink(missing_ok=True)
        references_path(backup).unlink(missing_ok=True)
    except BaseException as error:
        abandon_files(run)
        if isinstance(error, OSError):
            raise BackupError(f"cannot write the backup's .meta: {error.strerror}") from None
        raise
    run["duration_seconds"] = round(meta.duration_seconds, 3)
    run["complete"] = True
    return run


def _uploads_fields(run: Run) -> dict[str, str]:
    """The set's uploads and configuration as `.meta` fields (`uploads_*`; lists as JSON)."""
    uploads = run.get("uploads")
    if not uploads:
        return {}
    fields = {}
    for key, value in uploads.items():
        name = "file_encryption_key_sha256" if key == "key_sha256" else f"uploads_{key}"
        fields[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return fields


def offsite(run: Run, settings: Settings, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    """Send the repository this run's backup and every older complete local backup it lacks since its
    newest set, each confirmed (the repository's retention follows in the prune link). A failure fails
    the run and leaves every local backup as it was; the local prune does not run then, so nothing
    unsent is deleted, and the next run sends what this one could not."""
    from worker.repository.offsite import offsite as send_offsite

    lock.confirm()
    crash_point("offsite")
    with kept_alive(lock, renewal_interval(settings)) as lock_lost:
        run["offsite"] = send_offsite(settings, run["database"], run["run_id"], run.get("server_id"), run["backup"],
                                      progress)
        if lock_lost.is_set():
            lock.confirm()
    progress("sent offsite", {key: run["offsite"][key] for key in ("set", "bytes_added", "seconds")})
    return run


def _retain_in_repository(run: Run, settings: Settings, lock: DatabaseLock, progress: Progress) -> None:
    """Tag what the sets added and forget per REPOSITORY_KEEP_*. The sets are already safe: a failure here
    is a warning in the run's result (the next run applies the policy), never a failed backup."""
    from worker.repository.maintenance import retain
    from worker.repository.restic import RepositoryError

    offsite = run["offsite"]
    try:
        with kept_alive(lock, renewal_interval(settings)):
            kept = retain(settings, run["database"], run.get("server_id"), run["run_id"], offsite["sent"], progress)
    except RepositoryError as error:
        offsite["retention"] = f"not applied this time: {error}"
        run["warnings"].append(f"repository retention {offsite['retention']}")
        return
    for item in offsite["sent"]:
        item["set"] = kept["renamed"].get(item["set"], item["set"])
    if offsite.get("set"):
        offsite["set"] = kept["renamed"].get(offsite["set"], offsite["set"])
    offsite["forgotten"] = kept["forgotten"]


def prune(run: Run, settings: Settings, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    """Keep the newest BACKUP_RETAIN_COUNT complete backups of this database; remove crashed runs'
    leftovers; with a repository, record what this run's sets added and apply REPOSITORY_KEEP_* there.
    Then release the lock: the run is over."""
    lock.confirm()
    try:
        if "offsite" in run:
            _retain_in_repository(run, settings, lock, progress)
        backup = Path(run["backup"])
        doomed = catalogue.plan_prune(backup.parent, run["database"], settings.BACKUP_RETAIN_COUNT, keep=backup)
        if doomed:
            lock.confirm()  # right before deleting: a run that lost its lock deletes nothing
        run["deleted"] = [path.name for path in catalogue.delete_files(doomed)]
    finally:
        lock.release()
    incomplete = incomplete_set(run)
    if incomplete:
        raise BackupError(incomplete)
    # The run is good: the next scheduled one may skip its set if nothing changes (worker.backup.unchanged).
    record_set(settings, run["database"], run.get("server_id"), run["timestamp"], run.get("change_fingerprint"),
               off_site=bool(run.get("offsite")))
    return run


def incomplete_set(run: Run) -> str | None:
    """Why the run's set is not whole although every link ran (its uploads could not be captured, or
    references lead outside UPLOAD_DIR): the run then fails at its very end, after the backup was
    published, sent and pruned, so that the operator and the failure notification hear of it."""
    uploads = run.get("uploads") or {}
    done = f"{Path(run['backup']).name} is complete" + (" and off site" if run.get("offsite") else "")
    if uploads.get("error"):
        return f"{done}, but the set lacks its uploads: {uploads['error']}"
    if uploads.get("escaping"):
        names = ", ".join(uploads.get("escaping_names", [])[:5])
        return (f"{done}, but {uploads['escaping']} upload reference(s) lead outside UPLOAD_DIR and were not read "
                f"(UPLOADS_REFERENCES_QUERY): {names}")
    return None
