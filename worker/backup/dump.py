"""The dump link: pg_dump inside an exported snapshot, exact row counts in that same snapshot."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from worker.archive import catalogue, streams
from worker.archive.compression import check_supported, parse_compression
from worker.backup.run import Run, abandon_files, write_counts
from worker.backup.tma_version import newest_migration
from worker.backup.unchanged import fingerprint
from worker.coordination.locks import DatabaseLock, kept_alive, renewal_interval
from worker.errors import BackupError, first_line
from worker.pg.database import connect, exact_row_counts, exported_snapshot, server_major, server_version_text
from worker.pg.environment import tool_environment
from worker.pg.executors import Executor, ToolProcess, ToolResult
from worker.pg.identity import identity_of
from worker.pg.server_errors import ServerUnavailable, server_gone
from worker.progress import Progress, no_progress
from worker.settings import Settings
from worker.uploads.capture import capture_for_run
from worker.uploads.config import keep_configuration, uploads_enabled
from worker.uploads.references import Reference, read_references, references_path
from worker.uploads.references import save as save_references


def _create_private(path: Path) -> None:
    """Create `path` empty, mode 0600, refusing anything already there (a file, a link, a folder):
    the tools then write into a file only its owner can read, whatever the umask and folder mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError as error:
        raise BackupError(f"cannot create {path}: {error.strerror}") from None


def _sync_to_disk(path: Path) -> None:
    """pg_dump syncs a file it writes itself (`--file`); one written through a pipe (zstd-stream, docker
    mode) is synced here, before any link can call the backup complete."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise BackupError(f"cannot write {path.name} to disk: {error.strerror}") from None


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
            if compression.zstd_level is not None and streams.zstd_tool() is None:
                raise BackupError(streams.ZSTD_TOOL_MISSING)
            with connect(executor.connect_kwargs(), database, autocommit=True) as connection:
                if settings.BACKUP_SKIP_UNCHANGED:  # before the snapshot: a change meanwhile makes the next run's differ
                    change = fingerprint(settings, connection, database)
                    if change is not None:
                        run["change_fingerprint"] = change
                server = server_major(connection)
                if pg_dump_major < server:
                    raise BackupError(
                        f"pg_dump {pg_dump_major} is older than the server ({server}) and cannot dump it: "
                        f"install postgresql-client-{server} on this host or use docker mode (DB_CONTAINER)"
                    )
                run["server_version"] = server_version_text(connection)
                run["server_id"] = identity_of(connection)  # the set's `server:` tag, in its .meta too
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
                    query = settings.UPLOADS_REFERENCES_QUERY if uploads_enabled(settings, database) else None
                    result, counted = _dump_and_count(process, connection, partial, lock, lock_lost, progress, query)
            counts, references, migration = counted if counted is not None else (None, None, None)
            if result.returncode != 0 or counts is None:
                failure = ServerUnavailable if server_gone(result.stderr) else BackupError
                raise failure(f"pg_dump failed: {result.last_error_line()}")
            if not partial.exists() or partial.stat().st_size == 0:
                raise BackupError("pg_dump reported success but wrote nothing")
            _sync_to_disk(partial)
            if lock_lost.is_set():
                lock.confirm()  # raises with the reason
            write_counts(catalogue.counts_path(backup), counts)
            keep_configuration(settings, database, backup)  # the set's .env is the one of this moment
            if references is not None:
                save_references(references_path(backup), references)
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
    if migration is not None:
        run["tma_migration"] = migration
    run["tables"] = len(counts)
    run["dump_seconds"] = round(time.monotonic() - started, 3)
    progress("dumped", {"bytes": partial.stat().st_size})
    if uploads_enabled(settings, database):
        with kept_alive(lock, renewal_interval(settings)) as lock_lost:
            run["uploads"] = capture_for_run(run, settings, progress)
            if lock_lost.is_set():
                lock.confirm()
    return run


Counted = tuple[dict[str, int], list[Reference] | None, str | None]


def _count_and_reference(connection: psycopg.Connection[Any], query: str | None) -> Counted:
    counts = exact_row_counts(connection)
    references = read_references(connection, query) if query is not None else None
    return counts, references, newest_migration(connection)


def _dump_and_count(process: ToolProcess, connection: psycopg.Connection[Any], partial: Path, lock: DatabaseLock,
                    lock_lost: threading.Event, progress: Progress,
                    references_query: str | None = None) -> tuple[ToolResult, Counted | None]:
    """Count rows exactly on the snapshot's own session (in a thread) while pg_dump runs, watching the
    lock all along: a lost lock stops both at once, even while the counting waits on a table lock.
    With `references_query`, the uploads the database references are read in that same snapshot too.
    The result is None when pg_dump failed (the counting is then cancelled)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="count-rows") as pool:
        progress("counting rows", {})
        counting = pool.submit(_count_and_reference, connection, references_query)
        try:
            reported = 0.0
            while True:
                if lock_lost.is_set():
                    lock.confirm()  # raises: another run may take the lock; stop pg_dump now
                returncode = process.poll()
                if returncode is not None and (returncode != 0 or counting.done()):
                    break
                if counting.done() and counting.exception() is not None:
                    counting.result()  # raises the counting's own error
                # The phase shown stays "counting rows" until the counts are in (they usually take a moment;
                # waiting on a table lock, both wait), then pg_dump's progress.
                if returncode is None and counting.done() and time.monotonic() - reported >= 1:
                    written = partial.stat().st_size if partial.exists() else 0
                    progress("dumping", {"bytes": written})
                    reported = time.monotonic()
                time.sleep(0.05)
        except BaseException:
            process.kill()
            process.wait()
            _stop_counting(connection, counting)
            raise
        result = process.wait()
        if result.returncode != 0:
            _stop_counting(connection, counting)
            return result, None
        return result, counting.result()


def _stop_counting(connection: psycopg.Connection[Any], counting: Future[Counted]) -> None:
    if not counting.done():
        connection.cancel()
    try:
        counting.result()
    except Exception:
        pass  # cancelled or failed: the dump has already failed for its own reason
