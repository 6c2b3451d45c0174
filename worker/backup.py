"""The backup chain as plain functions: start → dump → verify → checksum → meta → prune.

Each step takes the run's small JSON dict (paths, ids, sizes, timings; never data or secrets) and
returns it with what the step learned. Celery tasks in `tasks/backup.py` are thin wrappers over these;
the CLI's in-process mode calls them in sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from worker import catalogue
from worker.compression import check_supported, parse_compression
from worker.database import connect, exact_row_counts, exported_snapshot, first_line, server_major, server_version_text
from worker.errors import BackupError
from worker.server_errors import ServerUnavailable, server_gone
from worker.executors import Executor
from worker.locks import DatabaseLock, kept_alive, renewal_interval
from worker.meta import BackupMeta, fsync_dir, human_size, write_atomically
from worker.settings import Settings, SettingsError, check_database_name, ensure_backup_dir, folder_warning

Run = dict[str, Any]
Progress = Callable[[str, dict[str, Any]], None]
HASH_CHUNK = 4 * 1024 * 1024


def no_progress(phase: str, fields: dict[str, Any]) -> None:
    pass


def tool_environment(settings: Settings, database: str) -> dict[str, str]:
    """Connection settings for the client tools: the environment, never argv."""
    environment = {
        "PGHOST": settings.DB_HOST,
        "PGPORT": str(settings.DB_PORT),
        "PGUSER": settings.DB_USER,
        "PGDATABASE": database,
        "PGAPPNAME": "tma-backup",
        "PGCONNECT_TIMEOUT": "10",
    }
    if settings.password:
        environment["PGPASSWORD"] = settings.password
    return environment


def start_run(settings: Settings, database: str, run_id: str, lock: DatabaseLock) -> Run:
    """Take the database's lock (owner: the run id) and choose the backup's name."""
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
    return {
        "run_id": run_id,
        "database": database,
        "backup": str(dump),
        "timestamp": catalogue.timestamp_of(dump, database),
        "host": settings.WORKER_HOST,
        "started_at": time.time(),
        "warnings": [warning] if warning else [],
    }


def _create_private(path: Path) -> None:
    """Create `path` empty, mode 0600, refusing anything already there (a file, a link, a folder):
    the tools then write into a file only its owner can read, whatever the umask and folder mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError as error:
        raise BackupError(f"cannot create {path}: {error.strerror}") from None


def dump(run: Run, settings: Settings, executor: Executor, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    """pg_dump inside an exported SERIALIZABLE READ ONLY DEFERRABLE snapshot, with exact row counts
    taken in that same snapshot, into `<name>.dump.partial`."""
    lock.confirm()
    backup = Path(run["backup"])
    partial = catalogue.partial_path(backup)
    database = run["database"]
    compression = parse_compression(settings.BACKUP_COMPRESSION)
    started = time.monotonic()
    with kept_alive(lock, renewal_interval(settings)) as lock_lost:
        try:
            pg_dump_major = executor.tool_major("pg_dump")
            try:
                check_supported(compression, pg_dump_major)
            except ValueError as error:
                raise BackupError(str(error)) from None
            with connect(executor.connect_kwargs(), database, autocommit=True) as connection:
                server = server_major(connection)
                if pg_dump_major < server:
                    raise BackupError(
                        f"pg_dump {pg_dump_major} is older than the server ({server}) and cannot dump it: "
                        f"install postgresql-client-{server} on this host or use docker mode (DB_CONTAINER)"
                    )
                run["server_version"] = server_version_text(connection)
                run["pg_dump_version"] = str(pg_dump_major)
                with exported_snapshot(connection, settings.PG_LOCK_WAIT_TIMEOUT) as snapshot:
                    options = [
                        "--format=custom",
                        f"--compress={compression.pg_dump_value}",
                        f"--snapshot={snapshot}",
                        "--no-owner",
                        "--no-privileges",
                        f"--lock-wait-timeout={settings.PG_LOCK_WAIT_TIMEOUT}",
                    ]
                    _create_private(partial)
                    process = executor.start_dump(
                        options, tool_environment(settings, database), partial, compression.zstd_level)
                    try:
                        progress("counting rows", {})
                        counts = exact_row_counts(connection)
                        reported = 0.0
                        while process.poll() is None:
                            if lock_lost.is_set():
                                lock.confirm()  # raises: another run may take the lock; stop pg_dump now
                            if time.monotonic() - reported >= 1:
                                written = partial.stat().st_size if partial.exists() else 0
                                progress("dumping", {"bytes": written})
                                reported = time.monotonic()
                            time.sleep(0.05)
                    except BaseException:
                        process.kill()
                        process.wait()
                        raise
                    result = process.wait()
            if result.returncode != 0:
                failure = ServerUnavailable if server_gone(result.stderr) else BackupError
                raise failure(f"pg_dump failed: {result.last_error_line()}")
            if not partial.exists() or partial.stat().st_size == 0:
                raise BackupError("pg_dump reported success but wrote nothing")
            if lock_lost.is_set():
                lock.confirm()  # raises with the reason
            _write_counts(catalogue.counts_path(backup), counts)
            if compression.zstd_level is not None and result.output_bytes:
                run["archive_bytes"] = result.output_bytes  # what a restore must decompress: room needed
        except BaseException as error:
            abandon_files(run)
            if isinstance(error, ServerUnavailable):
                raise
            if server_gone(error):
                raise ServerUnavailable(str(error) if isinstance(error, BackupError) else
                                        f"lost the database server during the dump: {first_line(error)}") from None
            if isinstance(error, BackupError):
                raise
            if isinstance(error, psycopg.Error):
                raise BackupError(f"database error during the dump: {first_line(error)}") from None
            if isinstance(error, OSError):
                raise BackupError(f"cannot write the dump into {partial.parent}: {error.strerror}") from None
            raise
    run["mode"] = executor.mode
    run["mode_fields"] = executor.meta_fields()
    run["tables"] = len(counts)
    run["dump_seconds"] = round(time.monotonic() - started, 3)
    progress("dumped", {"bytes": partial.stat().st_size})
    return run


def _write_counts(path: Path, counts: dict[str, int]) -> None:
    write_atomically(path, json.dumps(counts))


def _read_counts(path: Path) -> dict[str, int]:
    return {str(key): int(value) for key, value in json.loads(path.read_text()).items()}


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


def verify(run: Run, settings: Settings, executor: Executor, lock: DatabaseLock, progress: Progress = no_progress) -> Run:
    lock.confirm()
    partial = catalogue.partial_path(Path(run["backup"]))
    progress("verifying", {})
    try:
        with kept_alive(lock, renewal_interval(settings)) as lock_lost:
            empty_database = not _read_counts(catalogue.counts_path(Path(run["backup"])))
            run["toc_entries"] = verify_archive(partial, executor, settings, allow_empty=empty_database)
            if lock_lost.is_set():
                lock.confirm()
    except BaseException:
        abandon_files(run)
        raise
    return run


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
        counts = _read_counts(catalogue.counts_path(backup))
        extra = {
            "file_size_bytes": str(run["size_bytes"]),
            "pg_dump_version": run["pg_dump_version"],
            "server_version": run["server_version"],
            **run.get("mode_fields", {}),
            **({"archive_bytes": str(run["archive_bytes"])} if run.get("archive_bytes") else {}),
            "worker_host": run["host"],
            "machine": socket.gethostname(),
            "run_id": run["run_id"],
            "task_id": task_id or run["run_id"],
            "tool": "tma-backup",
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
    except BaseException as error:
        abandon_files(run)
        if isinstance(error, OSError):
            raise BackupError(f"cannot write the backup's .meta: {error.strerror}") from None
        raise
    run["duration_seconds"] = round(meta.duration_seconds, 3)
    run["complete"] = True
    return run


def prune(run: Run, settings: Settings, lock: DatabaseLock) -> Run:
    """Keep the newest BACKUP_RETAIN_COUNT complete backups of this database; remove crashed runs'
    leftovers. Then release the lock: the run is over."""
    lock.confirm()
    try:
        backup = Path(run["backup"])
        doomed = catalogue.plan_prune(backup.parent, run["database"], settings.BACKUP_RETAIN_COUNT, keep=backup)
        run["deleted"] = [path.name for path in catalogue.delete_files(doomed)]
    finally:
        lock.release()
    return run


def abandon_files(run: Run) -> list[str]:
    """Remove what this run wrote, short of a complete backup. Never touches other backups. Best effort:
    a file that cannot be removed (a read-only file system) stays for the next run's prune, and the
    caller still goes on to release the lock."""
    backup = Path(run["backup"])
    doomed = catalogue.run_files(backup)
    if not os.path.lexists(backup):
        doomed.append(catalogue.meta_path(backup))
    removed = []
    for path in doomed:
        try:
            removed += [found.name for found in catalogue.delete_files([path])]
        except OSError:
            pass
    return removed


def summary(run: Run) -> dict[str, Any]:
    """The chain's final result: small and readable in Flower and the result backend."""
    return {
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
