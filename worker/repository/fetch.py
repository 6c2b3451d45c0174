"""Fetch a set from the repository into BACKUP_DIR, as the backup it was: `<db>_<timestamp>.dump` and
its `.meta`, the dump's SHA-256 checked against the `.meta`. From there the restore (or drill) is the
same locked, token-guarded one as for a backup made here.

Works on a fresh machine: an empty BACKUP_DIR and nothing but the repository's address and password.
restic restores the two files into a private staging folder in BACKUP_DIR (`.fetch-<set>/`), where the
dump is checked; it leaves that folder only to be published like a backup: `.meta` first, then the
dump's final name. It never takes a `.partial` name in BACKUP_DIR, which a backup's prune of the same
database would take for a crashed run's leftover and delete mid-check. A crash leaves only the staging
folder, which nothing takes for a backup; the next fetch removes it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.archive.meta import MetaError, fsync_dir, human_size, parse_meta, write_atomically
from worker.archive.verification import sha256_of
from worker.errors import BackupError, VerificationFailed
from worker.faults import crash_point
from worker.progress import Progress, no_progress
from worker.repository.lock import using_repository
from worker.repository.restic import RepositoryError, Restic
from worker.repository.sets import RepositorySet, find_latest_whole, find_set, list_files
from worker.settings import Settings, SettingsError, ensure_backup_dir

ROOM_MARGIN = 64 * 1024 * 1024
STAGING_PREFIX = ".fetch-"  # inside BACKUP_DIR: the same file system, so the dump is renamed, not copied


def fetch(settings: Settings, reference: str, database: str | None, owner: str,
          progress: Progress = no_progress, server: str | None = None, whole: bool = False) -> dict[str, Any]:
    """Fetch set `reference` (`latest` of `database`, or an id) into BACKUP_DIR; returns the backup's
    file name, the set and what was done. The bytes are always downloaded and checked, also when the
    same backup is already here (a drill must prove the off-site copy, not the local one); an identical
    local copy is then kept as it is. `whole` (a restore of the uploads too): `latest` is the newest set
    that has its uploads part; the newer ones passed over are named in `passed_over`."""
    started = time.monotonic()
    try:
        directory = ensure_backup_dir(settings)
    except SettingsError as error:
        raise BackupError(str(error)) from None
    restic = Restic(settings)
    if reference == "latest" and server is None:
        server = this_server(settings, database)  # `latest` is this server's newest, unless told whose
    with using_repository(settings, owner, progress):
        if whole and reference == "latest":
            found, passed = find_latest_whole(restic, database, server)
        else:
            found, passed = find_set(restic, reference, database, server), []
        dump_name = _dump_name(found)
        meta_name = dump_name + catalogue.META_SUFFIX
        target = directory / dump_name
        needed = found.dump_bytes if found.dump_bytes is not None else \
            list_files(restic, found.id).files.get(dump_name, 0)  # a set written before the size: tag
        free = shutil.disk_usage(directory).free
        if free < needed + ROOM_MARGIN:
            raise BackupError(
                f"not enough free space in {directory} to fetch {dump_name}: it needs {human_size(needed)}B "
                f"(+{human_size(ROOM_MARGIN)}B margin), {human_size(free)}B are free; nothing was written")
        staging = directory / f"{STAGING_PREFIX}{found.short_id}"
        downloaded = staging / dump_name
        try:
            for leftover in directory.glob(f"{STAGING_PREFIX}*"):  # crashed fetches' (every fetch holds the lock)
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir(mode=0o700)
            progress("fetching from the repository", {"file": dump_name, "total_bytes": needed})
            # One `restic restore` of the two files: restic fetches in parallel, where `restic dump` streams
            # one file through one pipe (about 1.5 s slower on 500 MB from S3).
            restic.run(["restore", found.id, "--target", str(staging), "--include", "/" + dump_name,
                        "--include", "/" + meta_name])
            meta_text = _read_meta_text(staging / meta_name, found)
            try:
                meta = parse_meta(meta_text)
            except MetaError as error:
                raise VerificationFailed(f"set {found.short_id}: its .meta is unreadable ({error})") from None
            if meta.database != found.database or meta.timestamp != found.timestamp:
                raise VerificationFailed(f"set {found.short_id}: its .meta names another backup")
            os.chmod(downloaded, 0o600)
            sha256, size = sha256_of(downloaded, progress), downloaded.stat().st_size
            if sha256 != meta.sha256 or size != meta.file_size_bytes:
                raise VerificationFailed(
                    f"set {found.short_id}: {dump_name} as fetched ({size} bytes, SHA-256 {sha256[:16]}…) "
                    f"is not what its .meta records ({meta.file_size_bytes} bytes, {meta.sha256[:16]}…); not used")
            crash_point("fetch:publish")
            kept_local = _publish(target, downloaded, meta_text, meta.sha256)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise BackupError(f"cannot write {dump_name} in {directory}: {error.strerror}") from None
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "file": dump_name,
        "set": found.short_id,
        "database": found.database,
        "timestamp": found.timestamp,
        "size_bytes": meta.file_size_bytes,
        "sha256": meta.sha256,
        "already_local": kept_local,
        "passed_over": [{"set": item.short_id, "timestamp": item.timestamp} for item in passed],
        "host": settings.WORKER_HOST,
        "seconds": round(time.monotonic() - started, 3),
    }


def remove_stale_staging(settings: Settings, owner: str) -> list[str]:
    """The staging folders of fetches that died (a fetch holds the repository's lock while its folder
    exists: when the lock is free, none is running), removed; none when the lock is busy. Names removed."""
    directory = settings.backup_dir
    stale = sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []
    if not stale or not settings.repository:
        return []
    try:
        with using_repository(settings, owner, wait=0):
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
    except BackupError:  # a fetch is running (or the lock cannot be asked): the next repair
        return []
    return [path.name for path in stale]


def this_server(settings: Settings, database: str | None) -> str:
    """The identity of the server a restore of `database` goes to: `latest` is the newest set it made."""
    from worker.pg.executors import choose_executor
    from worker.pg.identity import server_identity

    return server_identity(settings, choose_executor(settings), database or settings.DB_NAME)


def _dump_name(found: RepositorySet) -> str:
    name = found.dump_name
    expected = {catalogue.backup_name(found.database, found.timestamp, suffix)
                for suffix in (catalogue.DUMP_SUFFIX, catalogue.ZST_DUMP_SUFFIX)}
    if name is None or name not in expected or f"{name}{catalogue.META_SUFFIX}" not in found.files:
        raise RepositoryError(f"set {found.short_id} does not hold one backup and its .meta (it holds {found.files})")
    return name


def _read_meta_text(path: Path, found: RepositorySet) -> str:
    if path.stat().st_size > 64 * 1024 * 1024:
        raise VerificationFailed(f"set {found.short_id}: {path.name} is far too large for a .meta")
    return path.read_text(encoding="utf-8", errors="replace")


def _publish(target: Path, downloaded: Path, meta_text: str, sha256: str) -> bool:
    """Publish the checked download like a backup: `.meta`, then the dump's final name. When that
    backup is already here, complete and recorded with the same SHA-256, keep it and drop the download
    (the bytes are identical). Returns whether the local copy was kept."""
    meta_file = catalogue.meta_path(target)
    if os.path.lexists(target):
        entry = catalogue.inspect_backup(target, *_database_and_timestamp(target, meta_text))
        if entry.complete and entry.meta is not None and entry.meta.sha256 == sha256 and target.is_file():
            downloaded.unlink()
            return True
        raise BackupError(f"{target.name} already exists in {target.parent} and is not this set's backup; "
                          "move it away first (nothing was changed)")
    write_atomically(meta_file, meta_text)
    os.replace(downloaded, target)
    fsync_dir(target.parent)
    return False


def _database_and_timestamp(target: Path, meta_text: str) -> tuple[str, str]:
    meta = parse_meta(meta_text)
    return meta.database, meta.timestamp
