"""Restore an archive into a scratch database shaped like the live one, and prove it: ANALYZE and
exact row counts equal to the `.meta`. A failure drops the scratch database; nothing live is touched."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from psycopg import conninfo

from worker.archive import streams
from worker.archive.meta import BackupMeta, human_size
from worker.errors import BackupError
from worker.faults import crash_point
from worker.pg.database import analyze_and_count
from worker.pg.environment import tool_environment
from worker.pg.executors import Executor
from worker.progress import Progress
from worker.restore import swap
from worker.restore.prepare import PreparedRestore
from worker.settings import Settings

ROOM_MARGIN = 64 * 1024 * 1024


def _restore_options(jobs: int, single_transaction: bool) -> list[str]:
    options = ["--exit-on-error", "--no-owner", "--no-privileges"]
    options += ["--single-transaction"] if single_transaction else [f"--jobs={jobs}"]
    return options


def check_room_to_decompress(archive: Path, meta: BackupMeta) -> None:
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
def restorable(archive: Path) -> Iterator[Path]:
    """The archive as pg_restore --jobs needs it (a `.dump.zst` decompressed to a private copy, removed
    afterwards); a decompression failure is one clear error."""
    with ExitStack() as stack:
        try:
            plain = stack.enter_context(streams.plain_archive(archive))
        except OSError as error:
            raise BackupError(f"cannot decompress {archive.name} for pg_restore: {error.strerror or error}") from None
        yield plain


def pg_restore(settings: Settings, executor: Executor, plain: Path, target: str, jobs: int,
                single_transaction: bool = False) -> None:
    environment = tool_environment(settings, target)
    options = [*_restore_options(jobs, single_transaction), f"--dbname={conninfo.make_conninfo(dbname=target)}"]
    result = executor.restore(options, environment, plain)
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {result.last_error_line()}")


def count_and_compare(settings: Settings, executor: Executor, database: str, expected: dict[str, int]) -> dict[str, int]:
    """ANALYZE the restored database and count its rows exactly; they must equal the backup's `.meta`."""
    counts = analyze_and_count(executor.connect_kwargs(), database, settings.RESTORE_JOBS)
    if counts == expected:
        return counts
    differences = [
        f"{table}: .meta {expected.get(table, 'absent')}, restored {counts.get(table, 'absent')}"
        for table in sorted(set(expected) | set(counts))
        if expected.get(table) != counts.get(table)
    ]
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    raise BackupError(f"row counts differ from the backup's .meta ({shown})")


def restore_into_scratch(settings: Settings, executor: Executor, admin: Any, prepared: PreparedRestore,
                          shape: swap.DatabaseShape, role: str, run: str, progress: Progress) -> tuple[str, dict[str, int]]:
    check_room_to_decompress(prepared.path, prepared.meta)
    scratch = swap.scratch_name(role)
    swap.create_like(admin, scratch, shape, role, prepared.meta.database, run)
    try:
        progress("restoring", {"database": scratch})
        with restorable(prepared.path) as plain:
            pg_restore(settings, executor, plain, scratch, settings.RESTORE_JOBS)
        crash_point("restore:restored")
        progress("counting", {})
        counts = count_and_compare(settings, executor, scratch, prepared.meta.row_counts)
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
