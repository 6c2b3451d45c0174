"""Restore as plain functions: prepare (no database touched) → token → locked restore into a scratch
database → checks → swap by rename. Plus rollback, and drills that never touch the live database.

Any failure before the swap drops the scratch database and leaves the live one exactly as it was.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import conninfo, sql

from worker import catalogue, streams, swap
from worker.backup import Progress, no_progress, tool_environment
from worker.database import analyze_and_count, first_line
from worker.errors import BackupError, VerificationFailed
from worker.executors import Executor
from worker.faults import crash_point
from worker.locks import DatabaseLock, kept_alive, renewal_interval
from worker.meta import BackupMeta, MetaError, human_size, read_meta
from worker.phases import PhaseClock
from worker.settings import Settings
from worker.tokens import TokenBinding, TokenRefused, TokenStore, consume
from worker.verification import verify_backup

MODES = ("swap", "in-place")
ROOM_MARGIN = 64 * 1024 * 1024


def resolve_backup_file(settings: Settings, file: str) -> Path:
    """The file, which must be a regular file inside BACKUP_DIR: no `..`, no absolute path elsewhere,
    no symlink (or symlinked folder) leading out."""
    folder = settings.backup_dir.resolve()
    given = Path(file)
    if ".." in given.parts:
        raise VerificationFailed(f"{file}: refused, '..' is not allowed in a backup path")
    candidate = given if given.is_absolute() else folder / given
    if not given.is_absolute() and not candidate.exists() and (Path.cwd() / given).exists():
        candidate = Path.cwd() / given  # a path relative to where the operator stands
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
        }


def prepare(settings: Settings, executor: Executor, file: str, checksum: bool = True) -> PreparedRestore:
    """Resolve, require .meta, check SHA-256 and TOC (which also proves pg_restore can read it).

    The restore task always checks the SHA-256 again under the lock, right before pg_restore reads the
    file. `checksum=False` leaves the check to it alone: for `restore FILE --confirm DB`, where no
    operator decision sits between the two passes, a second pass over the file would only cost time."""
    path = resolve_backup_file(settings, file)
    checked = verify_backup(path, settings, executor, checksum)
    return PreparedRestore(path, checked.meta, checked.toc_entries, checksum)


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


def _restore_options(jobs: int, single_transaction: bool) -> list[str]:
    options = ["--exit-on-error", "--no-owner", "--no-privileges"]
    options += ["--single-transaction"] if single_transaction else [f"--jobs={jobs}"]
    return options


def _check_room_to_decompress(archive: Path, meta: BackupMeta) -> None:
    """A `.dump.zst` is restored from a decompressed private copy beside it: refuse before anything is
    created when the folder cannot hold it (its size is in the .meta of backups that recorded it)."""
    recorded = meta.extra.get("archive_bytes", "")
    if not streams.is_compressed_stream(archive) or not recorded.isdigit():
        return
    needed, free = int(recorded), shutil.disk_usage(archive.parent).free
    if free < needed + ROOM_MARGIN:
        raise BackupError(
            f"not enough free space in {archive.parent} to decompress {archive.name} for pg_restore: it needs"
            f" {human_size(needed)}B (+{human_size(ROOM_MARGIN)}B margin), {human_size(free)}B are free; nothing was touched")


@contextmanager
def _plain(archive: Path) -> Iterator[Path]:
    """The archive as pg_restore --jobs needs it (a `.dump.zst` decompressed to a private copy, removed
    afterwards); a decompression failure is one clear error."""
    with ExitStack() as stack:
        try:
            plain = stack.enter_context(streams.plain_archive(archive))
        except OSError as error:
            raise BackupError(f"cannot decompress {archive.name} for pg_restore: {error.strerror or error}") from None
        yield plain


def _pg_restore(settings: Settings, executor: Executor, plain: Path, target: str, jobs: int,
                single_transaction: bool = False) -> None:
    environment = tool_environment(settings, target)
    options = [*_restore_options(jobs, single_transaction), f"--dbname={conninfo.make_conninfo(dbname=target)}"]
    result = executor.restore(options, environment, plain)
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {result.last_error_line()}")


def _analyze_and_count(settings: Settings, executor: Executor, database: str) -> dict[str, int]:
    return analyze_and_count(executor.connect_kwargs(), database, settings.RESTORE_JOBS)


def _compare_counts(expected: dict[str, int], actual: dict[str, int]) -> None:
    if expected == actual:
        return
    differences = [
        f"{table}: .meta {expected.get(table, 'absent')}, restored {actual.get(table, 'absent')}"
        for table in sorted(set(expected) | set(actual))
        if expected.get(table) != actual.get(table)
    ]
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    raise BackupError(f"row counts differ from the backup's .meta ({shown})")


def restore_into_scratch(settings: Settings, executor: Executor, admin: Any, prepared: PreparedRestore,
                          shape: swap.DatabaseShape, role: str, run: str, progress: Progress) -> tuple[str, dict[str, int]]:
    _check_room_to_decompress(prepared.path, prepared.meta)
    scratch = swap.scratch_name(role)
    swap.create_like(admin, scratch, shape, role, prepared.meta.database, run)
    try:
        progress("restoring", {"database": scratch})
        with _plain(prepared.path) as plain:
            _pg_restore(settings, executor, plain, scratch, settings.RESTORE_JOBS)
        crash_point("restore:restored")
        progress("counting", {})
        counts = _analyze_and_count(settings, executor, scratch)
        _compare_counts(prepared.meta.row_counts, counts)
    except BaseException:
        swap.drop(admin, scratch)
        raise
    return scratch, counts


def default_shape(admin: Any) -> swap.DatabaseShape:
    row = admin.execute(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype, current_user, true FROM pg_database"
        " WHERE datname = 'template1'"
    ).fetchone()
    return swap.DatabaseShape(*row)


def restore(settings: Settings, executor: Executor, store: TokenStore, token: str, confirm: str,
            lock: DatabaseLock, run: str, mode: str = "swap", progress: Progress = no_progress,
            file: str | None = None) -> dict[str, Any]:
    """The restore task's body. Consumes the token first: whatever happens next, it is used up.
    `file`, when the operator named one with the token, must be the file the token was issued for."""
    if mode not in MODES:
        raise BackupError(f"unknown restore mode {mode!r}; use one of {', '.join(MODES)}")
    binding = consume(store, token, confirm)
    if file is not None and resolve_backup_file(settings, file) != Path(binding.file):
        raise TokenRefused(f"restore refused: the token was issued for {Path(binding.file).name}, not {Path(file).name}")
    started = time.monotonic()
    clock = PhaseClock(progress)
    progress = clock
    lock.acquire()
    try:
        with kept_alive(lock, renewal_interval(settings)):
            progress("checking", {})
            path = Path(binding.file)
            # One pass over the file: prepare() checks its SHA-256 against the .meta, and the .meta's
            # against the token's, so the bytes restored are the bytes the operator confirmed.
            if recorded_sha256(path) != binding.sha256:
                raise VerificationFailed(f"{path.name} or its .meta changed since the restore was prepared; refused")
            prepared = prepare(settings, executor, str(path))
            result = _restore_locked(settings, executor, prepared, binding.database, run, mode, progress)
    finally:
        lock.release()
    result["duration_seconds"] = round(time.monotonic() - started, 3)
    result["phase_seconds"] = clock.finish()
    return result


def _restore_locked(settings: Settings, executor: Executor, prepared: PreparedRestore, live: str, run: str,
                    mode: str, progress: Progress) -> dict[str, Any]:
    with swap.admin_connection(executor.connect_kwargs(), live) as admin:
        cleaned = swap.drop_leftover_scratches(admin, live)
        repaired = swap.repair_refused_connections(admin, live)
        shape = swap.shape_of(admin, live)
        if mode == "in-place":
            counts = _restore_in_place(settings, executor, admin, prepared, live, shape or default_shape(admin), progress)
            kept, dropped = None, []
        else:
            scratch, counts = restore_into_scratch(
                settings, executor, admin, prepared, shape or default_shape(admin), swap.SCRATCH, run, progress)
            progress("swapping", {})
            if shape is None:
                admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(scratch), sql.Identifier(live)))
                admin.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(live)))
                kept = None
            else:
                kept = swap.kept_name(live, catalogue.utc_timestamp())
                try:
                    swap.carry_database_settings(admin, live, scratch)
                    swap.swap_in(admin, live, scratch, kept, run)
                except BaseException as error:
                    swap.drop(admin, scratch)
                    raise BackupError(f"the swap failed, the live database is unchanged: {first_line(error)}") from None
            dropped = swap.trim_kept(admin, live, settings.RESTORE_KEEP_PREVIOUS)
            if kept in dropped:
                kept = None
    return {
        "database": live,
        "file": str(prepared.path),
        "mode": mode,
        "tables": len(counts),
        "rows": sum(counts.values()),
        "row_counts": counts,
        "kept": kept,
        "dropped_previous": dropped,
        "cleaned_leftovers": cleaned,
        "repaired_connections": repaired,
    }


def _restore_in_place(settings: Settings, executor: Executor, admin: Any, prepared: PreparedRestore, live: str,
                      shape: swap.DatabaseShape, progress: Progress) -> dict[str, int]:
    """The seed's way, for hosts without room for two copies: drop, recreate, --single-transaction.
    A failure here leaves the database empty; the CLI warns before it starts. A `.dump.zst` is
    decompressed before the drop, so that a full disk cannot be what empties it."""
    _check_room_to_decompress(prepared.path, prepared.meta)
    with _plain(prepared.path) as plain:
        progress("dropping", {})
        if swap.shape_of(admin, live):
            swap.mark_swapping(admin, live, "in-place")
            swap.set_allow_connections(admin, live, False)
        swap.drop(admin, live)
        swap.create_database(admin, live, shape)
        progress("restoring", {"database": live})
        _pg_restore(settings, executor, plain, live, 1, single_transaction=True)
    progress("counting", {})
    counts = _analyze_and_count(settings, executor, live)
    _compare_counts(prepared.meta.row_counts, counts)
    return counts


def rollback(settings: Settings, executor: Executor, live: str, confirm: str, lock: DatabaseLock, run: str) -> dict[str, Any]:
    """Swap the newest kept previous copy back in; the database it replaces is kept in its turn."""
    if confirm != live:
        raise BackupError(f"rollback refused: the confirmation {confirm!r} does not match the database {live!r}")
    lock.acquire()
    try:
        with swap.admin_connection(executor.connect_kwargs(), live) as admin:
            kept = swap.managed(admin, live, swap.KEPT)
            if not kept:
                raise BackupError(f"no kept previous copy of {live!r} to roll back to")
            previous = kept[-1].name
            swap.set_allow_connections(admin, previous, True)
            replaced = swap.kept_name(live, catalogue.utc_timestamp(), "pre_rollback")
            try:
                swap.swap_in(admin, live, previous, replaced, run)
            except BaseException:
                swap.set_allow_connections(admin, previous, False)
                raise
    finally:
        lock.release()
    return {"database": live, "restored_from": previous, "kept": replaced}
