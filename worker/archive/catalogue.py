"""The backup catalogue: names, listing, completeness and retention.

A backup is `BACKUP_DIR/<DB_NAME>_<YYYYmmddTHHMMSSZ>.dump`. It is *complete* only when the `.dump` and
its `.meta` both exist as regular files and the `.meta` parses and names the same database. Retention
counts complete backups only and deletes only files that this tool made.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from worker.archive.meta import BackupMeta, MetaError, read_meta

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_TIMESTAMP = r"(?P<timestamp>\d{8}T\d{6}Z)"
DUMP_SUFFIX = ".dump"
ZST_DUMP_SUFFIX = ".dump.zst"  # the zstd-stream fast mode
_ANY_DUMP = r"\.dump(?:\.zst)?"
META_SUFFIX = ".meta"
ENV_SUFFIX = ".env"
PARTIAL_SUFFIX = ".partial"


def utc_timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


def backup_name(database: str, timestamp: str, suffix: str = DUMP_SUFFIX) -> str:
    return f"{database}_{timestamp}{suffix}"


def timestamp_of(dump: Path, database: str) -> str:
    return dump.name.removeprefix(f"{database}_").removesuffix(ZST_DUMP_SUFFIX).removesuffix(DUMP_SUFFIX)


def _pattern(database: str, suffix: str) -> re.Pattern[str]:
    """`<database>_<timestamp><.dump or .dump.zst><suffix>`."""
    return re.compile(re.escape(database) + "_" + _TIMESTAMP + _ANY_DUMP + re.escape(suffix) + r"\Z", re.DOTALL)


def meta_path(dump: Path) -> Path:
    return dump.with_name(dump.name + META_SUFFIX)


def env_path(dump: Path) -> Path:
    """TMA Cloud's configuration file as it was when the dump was taken, kept beside it (mode 0600) for
    its set: a set sent later (after an outage) carries the `.env` of its own time, not today's."""
    return dump.with_name(dump.name + ENV_SUFFIX)


def partial_path(dump: Path) -> Path:
    return dump.with_name(dump.name + PARTIAL_SUFFIX)


def counts_path(dump: Path) -> Path:
    """Row counts taken inside the dump's snapshot, kept beside the partial file until meta is written."""
    return dump.with_name(dump.name + PARTIAL_SUFFIX + ".counts")


def run_files(dump: Path) -> list[Path]:
    """Every file a run in progress may have written for this backup, final names excluded."""
    return [partial_path(dump), counts_path(dump), partial_path(dump).with_name(partial_path(dump).name + ".refs"),
            meta_path(dump).with_name(meta_path(dump).name + ".tmp")]


def new_backup_path(directory: Path, database: str, suffix: str = DUMP_SUFFIX) -> Path:
    """A fresh name; waits for the next second when a backup of this second already exists."""
    while True:
        timestamp = utc_timestamp()
        names = [directory / backup_name(database, timestamp, kind) for kind in (DUMP_SUFFIX, ZST_DUMP_SUFFIX)]
        dump = directory / backup_name(database, timestamp, suffix)
        taken = [path for name in names for path in (name, meta_path(name), env_path(name), *run_files(name))]
        if not any(os.path.lexists(path) for path in taken):
            return dump
        time.sleep(0.25)


def locate(directory: Path, file: str) -> Path:
    """Where a FILE argument points: a relative name is looked up in `directory` (BACKUP_DIR) first,
    then where the operator stands; an absolute path is taken as it is. Nothing is checked here."""
    given = Path(file)
    if given.is_absolute():
        return given
    in_folder = directory / given
    return in_folder if in_folder.exists() or not given.exists() else given.absolute()


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass
class BackupEntry:
    path: Path
    database: str
    timestamp: str
    size: int
    meta: BackupMeta | None
    problem: str | None  # why it is not complete; None when it is

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def created(self) -> datetime:
        return parse_timestamp(self.timestamp)


def inspect_backup(dump: Path, database: str, timestamp: str) -> BackupEntry:
    size = os.lstat(dump).st_size if os.path.lexists(dump) else 0
    meta: BackupMeta | None = None
    problem: str | None = None
    sidecar = meta_path(dump)
    if not _is_regular_file(sidecar):
        problem = "no .meta"
    else:
        try:
            meta = read_meta(sidecar)
        except MetaError as error:
            problem = f".meta unreadable: {error}"
        else:
            if meta.database != database or meta.timestamp != timestamp:
                problem = ".meta names another backup"
    return BackupEntry(dump, database, timestamp, size, meta, problem)


def list_backups(directory: Path, database: str) -> list[BackupEntry]:
    """This database's backups by this tool's naming, oldest first; symlinks and folders are skipped."""
    pattern = _pattern(database, "")
    entries = []
    for name in _names(directory):
        match = pattern.match(name)
        if match and _is_regular_file(directory / name):
            entries.append(inspect_backup(directory / name, database, match["timestamp"]))
    return sorted(entries, key=lambda entry: entry.timestamp)


def list_all_backups(directory: Path) -> list[BackupEntry]:
    """Every `*_<timestamp>.dump` regular file in the folder, whatever its database, oldest first."""
    any_database = re.compile(r"(?P<database>.+)_" + _TIMESTAMP + _ANY_DUMP + r"\Z", re.DOTALL)
    entries = []
    for name in _names(directory):
        match = any_database.match(name)
        if match and _is_regular_file(directory / name):
            entries.append(inspect_backup(directory / name, match["database"], match["timestamp"]))
    return sorted(entries, key=lambda entry: (entry.timestamp, entry.database))


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def newest_complete(directory: Path, database: str) -> BackupEntry | None:
    complete = [entry for entry in list_backups(directory, database) if entry.complete]
    return complete[-1] if complete else None


def plan_prune(directory: Path, database: str, retain: int, keep: Path | None = None) -> list[Path]:
    """The files retention would delete: complete backups beyond the newest `retain`, and leftovers of
    crashed runs of this database (partial files, a `.meta` whose dump never got its final name).
    `keep` (the backup just made) is never deleted, whatever the clock says."""
    if retain < 1:
        raise ValueError("BACKUP_RETAIN_COUNT must be at least 1")
    complete = [entry for entry in list_backups(directory, database) if entry.complete]
    doomed: list[Path] = []
    for entry in complete[: max(len(complete) - retain, 0)]:
        if keep is not None and entry.path == keep:
            continue
        doomed += [entry.path, meta_path(entry.path), env_path(entry.path)]
    leftovers = [
        _pattern(database, PARTIAL_SUFFIX),
        _pattern(database, PARTIAL_SUFFIX + ".counts"),
        _pattern(database, META_SUFFIX + ".tmp"),
    ]
    leftovers.append(re.compile(  # a crashed restore's decompressed copy of a .dump.zst (streams.plain_archive)
        r"\." + re.escape(database) + "_" + _TIMESTAMP + _ANY_DUMP + r"\.restore-[0-9a-f]{8}\.dump\Z", re.DOTALL))
    sidecars = [(_pattern(database, suffix), suffix) for suffix in (META_SUFFIX, ENV_SUFFIX)]
    for name in _names(directory):
        path = directory / name
        if not _is_regular_file(path) or path in doomed:
            continue
        if any(pattern.match(name) for pattern in leftovers):
            doomed.append(path)
        elif any(pattern.match(name) and not os.path.lexists(path.with_name(name.removesuffix(suffix)))
                 for pattern, suffix in sidecars):  # a .meta or .env whose dump never got (or lost) its name
            doomed.append(path)
    return doomed


def delete_files(paths: list[Path]) -> list[Path]:
    deleted = []
    for path in paths:
        try:
            path.unlink()
            deleted.append(path)
        except FileNotFoundError:
            pass
    return deleted
