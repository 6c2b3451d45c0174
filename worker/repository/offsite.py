"""The offsite link: this run's backup, and every complete local backup of the database that the
repository lacks since its newest set (oldest first, so an outage of the remote heals at the next run),
each becomes a set confirmed by listing it back. Calendar retention in the repository runs in the prune
link (`worker.repository.maintenance.retain`).

Nothing here touches the local backups: a failure leaves them exactly as they were, complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from worker.archive import catalogue
from worker.archive.catalogue import BackupEntry
from worker.archive.compression import is_compressed
from worker.progress import Progress, no_progress
from worker.repository import handover
from worker.repository.lock import using_repository
from worker.repository.restic import RepositoryError, Restic
from worker.repository.sets import DATABASE_PART, list_files, list_sets, set_tags, set_time
from worker.settings import Settings

STAGING_PREFIX = ".offsite-staging-"  # `backup --time`, read in the TZ restic runs with (UTC)


@dataclass
class SentSet:
    id: str
    timestamp: str
    bytes_added: int
    seconds: float
    confirm_seconds: float  # of `seconds`: listing the set back (one restic command, mostly its key derivation)


def offsite(settings: Settings, database: str, run_id: str, server: str | None, current: str | None = None,
            progress: Progress = no_progress) -> dict[str, Any]:
    """Send `current` (this run's complete backup) and every other complete local backup of `database`
    newer than the repository's newest set of this server (`server`, with the sets made before sets named
    their server; never another server's) that the repository lacks (what failed runs could not send;
    an older one missing was forgotten by retention and stays forgotten). Each set is confirmed by
    listing it back. Raises RepositoryError; the local backups are never touched.

    The listing comes first, then the uploads: on two cores a listing beside the upload slowed it by
    more (about 1.5 s on 500 MB) than the listing costs on its own (about 0.5 s: restic's key derivation).
    When the previous run's prune link handed its listing over and it leaves only this run's own backup
    to send, the repository is not listed again (`worker.repository.handover`)."""
    started = time.monotonic()
    restic = Restic(settings)
    local = [entry for entry in catalogue.list_backups(settings.backup_dir, database) if entry.complete]
    own = next((entry for entry in local if current and entry.path == Path(current)), None)
    sent: list[SentSet] = []
    handed = handover.take(settings, database, server)  # before anything is sent: a retried link lists
    with using_repository(settings, run_id, progress):
        waiting = _waiting(local, own, handed) if handed is not None else []
        listed = own is None or waiting != [own]
        if listed:
            waiting = _waiting(local, own, {found.timestamp for found in list_sets(restic, database)
                                            if found.server in (server, None)})
        for number, entry in enumerate(waiting, 1):
            progress("sending offsite", {"file": entry.path.name, "set": number, "sets": len(waiting)})
            sent.append(send(restic, entry, run_id, settings.WORKER_HOST, server, progress))
    return {
        "repository": restic.shown,
        "set": next((item.id[:8] for item in sent if own is not None and item.timestamp == own.timestamp), None),
        "bytes_added": sum(item.bytes_added for item in sent),
        "sent": [{"set": item.id[:8], "timestamp": item.timestamp, "bytes_added": item.bytes_added,
                  "seconds": round(item.seconds, 3), "confirm_seconds": round(item.confirm_seconds, 3)}
                 for item in sent],
        "seconds": round(time.monotonic() - started, 3),
        "confirm_seconds": round(sum(item.confirm_seconds for item in sent), 3),
        "listing": "repository" if listed else "handed over",
    }


def _waiting(local: list[BackupEntry], own: BackupEntry | None, present: set[str]) -> list[BackupEntry]:
    """What to send, oldest first (this run's own last): the complete local backups the repository lacks
    that are newer than its newest set, and this run's own."""
    newest = max(present, default="")
    return [entry for entry in local if entry.timestamp not in present and (entry.timestamp > newest or entry is own)]


@contextmanager
def _staged(dump: Path, meta: Path, configuration: Path | None) -> Iterator[tuple[Path, dict[str, int]]]:
    """The folder restic runs in and the names (with sizes) the set must hold. Without a configuration
    file that is BACKUP_DIR itself; with one (the `.env` kept beside the backup when it was taken), a
    private staging folder in BACKUP_DIR holding hard links to the three (no copy), the configuration
    as `<backup name>.env`, removed afterwards (a crash leaves it for the next send to remove)."""
    if configuration is None:
        yield dump.parent, {dump.name: dump.stat().st_size, meta.name: meta.stat().st_size}
        return
    for leftover in dump.parent.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    folder = dump.parent / f"{STAGING_PREFIX}{dump.name}"  # one name per backup: the set lists the same paths
    try:
        folder.mkdir(mode=0o700)
        os.link(dump, folder / dump.name)
        os.link(meta, folder / meta.name)
        env_name = dump.name.removesuffix(catalogue.ZST_DUMP_SUFFIX).removesuffix(catalogue.DUMP_SUFFIX) + ".env"
        os.link(configuration, folder / env_name)
        yield folder, {name: (folder / name).stat().st_size for name in (dump.name, meta.name, env_name)}
    except OSError as error:
        raise RepositoryError(f"cannot stage {dump.name} with its configuration in {dump.parent}: {error.strerror}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def send(restic: Restic, entry: BackupEntry, run_id: str, host: str, server: str | None,
         progress: Progress = no_progress) -> SentSet:
    """One backup (its dump, its `.meta` and the configuration file kept with it, if any) as the
    database part of its set, confirmed by listing it back."""
    started = time.monotonic()
    dump, meta = entry.path, catalogue.meta_path(entry.path)
    kept = catalogue.env_path(dump)
    configuration = kept if os.path.isfile(kept) and not os.path.islink(kept) else None
    run_of_backup = (entry.meta.extra.get("run_id") if entry.meta else None) or run_id
    summary: dict[str, Any] = {}

    def on_line(message: dict[str, Any]) -> None:
        kind = message.get("message_type")
        if kind == "summary":
            summary.update(message)
        elif kind == "status":
            progress("sending offsite", {"file": dump.name, "bytes_done": int(message.get("bytes_done", 0)),
                                         "total_bytes": int(message.get("total_bytes", 0))})

    moment = set_time(entry.timestamp)
    made_on = (entry.meta.extra.get("server_id") if entry.meta else None) or server  # a backup of before: this run's
    migration = entry.meta.extra.get("tma_migration") if entry.meta else None  # which TMA Cloud the set is of
    tags = [*set_tags(entry.database, entry.timestamp, run_of_backup, made_on), f"part:{DATABASE_PART}",
            *([f"tma:{quote(migration, safe='')}"] if migration else []),
            f"size:{dump.stat().st_size}"]
    # A compressed dump is incompressible: restic's compression would cost CPU (a sixth of the upload on
    # two cores) and save nothing. An uncompressed one (BACKUP_COMPRESSION=0) is left to restic to compress.
    compressed = entry.meta is not None and is_compressed(entry.meta.compression)
    with _staged(dump, meta, configuration) as (folder, expected):
        restic.run(
            ["backup", "--json", *(["--compression", "off"] if compressed else []), "--host", host,
             "--time", moment, "--tag", ",".join(tags), *sorted(expected)],
            cwd=folder, on_json=on_line,
        )
    snapshot = str(summary.get("snapshot_id") or "")
    if not snapshot:
        raise RepositoryError(f"restic reported no set for {dump.name}; nothing was recorded as sent")
    confirming = time.monotonic()
    listed = confirm(restic, snapshot, expected)
    done = time.monotonic()
    return SentSet(listed, entry.timestamp, int(summary.get("data_added", 0)), done - started, done - confirming)


def confirm(restic: Restic, snapshot: str, expected: dict[str, int]) -> str:
    """The set must list exactly the files sent, with their sizes; else it is forgotten and the run
    fails. Returns the set's full id."""
    listing = list_files(restic, snapshot)
    listed = listing.files
    if listed != expected or not listing.id:
        restic.run(["forget", snapshot], check=False)
        raise RepositoryError(
            f"set {snapshot[:8]} does not hold what was sent (it lists {sorted(listed.items())}, expected "
            f"{sorted(expected.items())}); it was forgotten, and the backup stays complete locally"
        )
    return listing.id
