"""Restore as plain functions: prepare (no database touched) → token → locked restore into a scratch
database → checks → swap by rename. Plus rollback, and drills that never touch the live database.

Any failure before the swap drops the scratch database and leaves the live one exactly as it was.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from psycopg import sql

from worker.archive import catalogue
from worker.coordination.locks import DatabaseLock, held, renewal_interval
from worker.errors import BackupError, VerificationFailed, first_line
from worker.pg.executors import Executor
from worker.progress import PhaseClock, Progress, no_progress
from worker.restore import pending, swap
from worker.restore.prepare import PreparedRestore, prepare, recorded_sha256, resolve_backup_file
from worker.restore.scratch import (
    check_room_to_decompress,
    count_and_compare,
    default_shape,
    pg_restore,
    restorable,
    restore_into_scratch,
)
from worker.restore.tokens import TokenRefused, TokenStore, consume
from worker.settings import Settings
from worker.uploads import restore as uploads_restore
from worker.uploads import swap as uploads_swap

MODES = ("swap", "in-place")
UPLOADS_CHOICES = ("none", "with", "only")


def restore(settings: Settings, executor: Executor, store: TokenStore, token: str, confirm: str,
            lock: DatabaseLock, run: str, mode: str = "swap", progress: Progress = no_progress,
            file: str | None = None, uploads: str = "none") -> dict[str, Any]:
    """The restore task's body. Consumes the token first: whatever happens next, it is used up.
    `file`, when the operator named one with the token, must be the file the token was issued for.
    `uploads`: `none` (the database only), `with` (the set's uploads too, swapped together with the
    database) or `only` (the set's uploads alone; the live database is not touched)."""
    if mode not in MODES:
        raise BackupError(f"unknown restore mode {mode!r}; use one of {', '.join(MODES)}")
    if uploads not in UPLOADS_CHOICES:
        raise BackupError(f"unknown uploads choice {uploads!r}; use one of {', '.join(UPLOADS_CHOICES)}")
    if uploads != "none" and mode != "swap":
        raise BackupError("restoring uploads needs swap mode: in-place mode cannot keep the current files aside")
    binding = consume(store, token, confirm)
    if file is not None and resolve_backup_file(settings, file) != Path(binding.file):
        raise TokenRefused(f"restore refused: the token was issued for {Path(binding.file).name}, not {Path(file).name}")
    started = time.monotonic()
    clock = PhaseClock(progress)
    progress = clock
    with held(lock, renewal_interval(settings)):
        progress("checking", {})
        path = Path(binding.file)
        # One pass over the file: prepare() checks its SHA-256 against the .meta, and the .meta's
        # against the token's, so the bytes restored are the bytes the operator confirmed.
        if recorded_sha256(path) != binding.sha256:
            raise VerificationFailed(f"{path.name} or its .meta changed since the restore was prepared; refused")
        prepared = prepare(settings, executor, str(path))
        settled = settle_uploads(settings, executor, binding.database)
        if settled is not None and settled.forward and settled.journal.sha256 == binding.sha256:
            # The interrupted restore was of this very backup: finishing it did the work. Restoring it again
            # would keep the restored copy and drop the one that restore kept, which a rollback needs.
            result = _finished_before(prepared, binding.database, settled)
            result["duration_seconds"] = round(time.monotonic() - started, 3)
            result["phase_seconds"] = clock.finish()
            return result
        plan = uploads_restore.plan(settings, prepared.meta, run, binding.database) if uploads != "none" else None
        if plan is not None and uploads == "only":
            result = _restore_uploads_only(settings, executor, prepared, binding.database, run, plan, progress, lock)
        else:
            result = _restore_locked(settings, executor, prepared, binding.database, run, mode, progress, lock, plan)
        if settled is not None:
            result["settled_uploads"] = settled.message
    result["duration_seconds"] = round(time.monotonic() - started, 3)
    result["phase_seconds"] = clock.finish()
    return result


def _finished_before(prepared: PreparedRestore, live: str, settled: uploads_swap.Settled) -> dict[str, Any]:
    """The result of a restore whose work an interrupted run of the same restore had done: its swap,
    settled forward, put this backup's database (its counts compared before that swap) and files in."""
    counts = prepared.meta.row_counts
    return {
        "database": live, "file": str(prepared.path), "mode": "swap", "tables": len(counts), "rows": sum(counts.values()),
        "row_counts": counts, "kept": settled.journal.kept, "dropped_previous": [], "cleaned_leftovers": [],
        "repaired_connections": False,
        "settled_uploads": f"{settled.message}; it was a restore of this same backup, so nothing more was done",
    }


def settle_uploads(settings: Settings, executor: Executor, live: str) -> uploads_swap.Settled | None:
    """Finish or undo an uploads swap a crash interrupted (`worker.restore.pending`); the caller holds
    the database's lock."""
    if settings.UPLOAD_DIR is None or not (settings.UPLOAD_DIR / uploads_swap.JOURNAL).exists():
        return None
    with swap.admin_connection(executor.connect_kwargs(), live) as admin:
        return pending.settle_uploads(settings, admin, live)


def _restore_uploads_only(settings: Settings, executor: Executor, prepared: PreparedRestore, live: str, run: str,
                          plan: uploads_restore.UploadsPlan, progress: Progress, lock: DatabaseLock) -> dict[str, Any]:
    """The set's uploads alone, checked against the live database's references, swapped in; the files
    that were live are kept aside. The database is not touched."""
    staged = uploads_restore.stage(settings, plan, run, progress)
    try:
        checked = uploads_restore.check_staged(settings, executor.connect_kwargs(), live, plan, staged, strict=False)
        progress("swapping", {})
        lock.confirm()
    except BaseException:
        uploads_swap.drop_staged(plan.folder, plan.staged)
        raise
    swapped = uploads_swap.swap_uploads_only(plan.folder, plan.staged, run, live)
    with swap.admin_connection(executor.connect_kwargs(), live) as admin:
        tidied = pending.tidy_uploads(settings, admin, live)
    return {
        "database": live, "file": str(prepared.path), "mode": "uploads-only", "tables": 0, "rows": 0,
        "row_counts": {}, "kept": None, "dropped_previous": [], "cleaned_leftovers": [], "repaired_connections": False,
        "uploads": {**plan.describe(settings), **checked, "files": len(staged), "previous": swapped.previous,
                    "left_in_place": swapped.left, "removed_previous": tidied},
    }


def _restore_locked(settings: Settings, executor: Executor, prepared: PreparedRestore, live: str, run: str,
                    mode: str, progress: Progress, lock: DatabaseLock,
                    plan: uploads_restore.UploadsPlan | None = None) -> dict[str, Any]:
    """Every destructive step (drop, rename) is preceded by `lock.confirm()`: a restore whose lock
    expired or was taken meanwhile stops before it, and a failure before the swap drops only its own
    scratch copy (and the staged uploads). With `plan`, the set's uploads are fetched beside the live
    ones while pg_restore fills the scratch copy (one is mostly network and disk, the other the
    database server), then checked against the restored copy's references and swapped together with it."""
    if plan is None:
        return _restore_database(settings, executor, prepared, live, run, mode, progress, lock, None, None)
    uploads_swap.check_room(plan.folder, plan.bytes)  # before anything starts: a full disk touches nothing
    progress("fetching uploads", {"bytes": plan.bytes})
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-uploads") as pool:
        staging = pool.submit(_timed_stage, settings, plan, run)
        try:
            result = _restore_database(settings, executor, prepared, live, run, mode, progress, lock, plan, staging)
        except BaseException:
            try:
                staging.result()  # restic finishes (or fails) before its folder is removed
            except BaseException:
                pass
            if not (plan.folder / uploads_swap.JOURNAL).exists():
                uploads_swap.drop_staged(plan.folder, plan.staged)
            raise
    staged, seconds = staging.result()
    swapped: uploads_swap.Swapped = result.pop("uploads_swapped")
    result["uploads"] = {**plan.describe(settings), **result.pop("uploads_checked"), "files": len(staged),
                         "fetch_seconds": seconds, "previous": swapped.previous, "left_in_place": swapped.left,
                         "removed_previous": result.pop("uploads_tidied"),
                         "previous_folders": uploads_swap.previous_folders(plan.folder)}
    return result


def _timed_stage(settings: Settings, plan: uploads_restore.UploadsPlan, run: str) -> tuple[dict[str, int], float]:
    started = time.monotonic()
    staged = uploads_restore.stage(settings, plan, run)
    return staged, round(time.monotonic() - started, 3)


def _restore_database(settings: Settings, executor: Executor, prepared: PreparedRestore, live: str, run: str,
                      mode: str, progress: Progress, lock: DatabaseLock, plan: uploads_restore.UploadsPlan | None,
                      staging: Future[tuple[dict[str, int], float]] | None) -> dict[str, Any]:
    uploads_checked: dict[str, Any] = {}
    swapped: uploads_swap.Swapped | None = None
    tidied: list[str] = []
    with swap.admin_connection(executor.connect_kwargs(), live) as admin:
        lock.confirm()
        cleaned = swap.drop_leftover_scratches(admin, live)
        repaired = swap.repair_refused_connections(admin, live)
        shape = swap.shape_of(admin, live)
        if mode == "in-place":
            counts = _restore_in_place(settings, executor, admin, prepared, live, shape or default_shape(admin), progress,
                                       lock)
            kept, dropped = None, []
        else:
            scratch, counts = restore_into_scratch(
                settings, executor, admin, prepared, shape or default_shape(admin), swap.SCRATCH, run, progress)
            try:
                if plan is not None and staging is not None:
                    progress("checking uploads", {})
                    staged, _ = staging.result()  # the fetch ran beside pg_restore; its failure fails the restore
                    uploads_checked = uploads_restore.check_staged(settings, executor.connect_kwargs(), scratch, plan,
                                                                   staged)
                progress("swapping", {})
                lock.confirm()
            except BaseException:
                swap.drop(admin, scratch)  # our own copy: never needed again
                raise
            if shape is None:
                def swap_database() -> None:
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(scratch), sql.Identifier(live)))
                    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(live)))

                kept = None
            else:
                kept = swap.free_kept_name(admin, live, catalogue.utc_timestamp())

                def swap_database() -> None:
                    try:
                        swap.apply_database_access(admin, scratch, swap.read_database_access(admin, live), with_comment=False)
                        swap.swap_in(admin, live, scratch, kept or "", run)
                    except BaseException as error:
                        swap.drop(admin, scratch)
                        raise BackupError(f"the swap failed, the live database is unchanged: {first_line(error)}") from None

            if plan is not None:
                _, swapped = uploads_swap.swap_uploads(plan.folder, plan.staged, run, live, kept, swap_database, scratch,
                                                       prepared.meta.sha256)
            else:
                swap_database()
            lock.confirm()
            dropped = swap.trim_kept(admin, live, settings.RESTORE_KEEP_PREVIOUS)
            if kept in dropped:
                kept = None
            tidied = pending.tidy_uploads(settings, admin, live)  # the files set aside with a dropped copy go too
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
        **({"uploads_checked": uploads_checked, "uploads_swapped": swapped, "uploads_tidied": tidied}
           if plan is not None else {}),
    }


def _restore_in_place(settings: Settings, executor: Executor, admin: Any, prepared: PreparedRestore, live: str,
                      shape: swap.DatabaseShape, progress: Progress, lock: DatabaseLock) -> dict[str, int]:
    """The seed's way, for hosts without room for two copies: drop, recreate, --single-transaction.
    A failure here leaves the database empty; the CLI warns before it starts. A `.dump.zst` is
    decompressed before the drop, so that a full disk cannot be what empties it. What the dump does not
    hold is read before the drop: GRANTs and comment go to the new database before pg_restore, its
    settings after pg_restore and the counts (as in swap mode: `default_transaction_read_only` would
    stop pg_restore), also when these fail, so that a failed restore leaves them in place."""
    check_room_to_decompress(prepared.path, prepared.meta)
    access, created = None, False
    try:
        with restorable(prepared.path) as plain:
            progress("dropping", {})
            lock.confirm()
            if swap.shape_of(admin, live):
                access = swap.read_database_access(admin, live)  # before the mark: the marker is never carried
                swap.mark_swapping(admin, live, "in-place")
                swap.set_allow_connections(admin, live, False)
            swap.drop(admin, live)  # the marker goes with the database's settings
            swap.create_database(admin, live, shape)
            created = True
            if access is not None:
                swap.apply_database_access(admin, live, access, with_settings=False)
            progress("restoring", {"database": live})
            pg_restore(settings, executor, plain, live, 1, single_transaction=True)
        progress("counting", {})
        return count_and_compare(settings, executor, live, prepared.meta.row_counts)
    finally:
        if created and access is not None:
            swap.apply_database_settings(admin, live, access)
