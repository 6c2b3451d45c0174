"""The repository's upkeep: creating it, calendar retention (`forget`, with every run), reclaiming
space (`prune`, weekly in beat: it reads every index and rewrites packs, the costly part), and checks.
Each runs under the repository's lock (`worker.repository.lock`), never beside a backup or a restore.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from worker.progress import Progress, no_progress
from worker.repository import handover
from worker.repository.lock import using_repository
from worker.repository.restic import RepositoryError, RepositoryMissing, Restic
from worker.repository.sets import (
    DATABASE_PART,
    TOOL_TAG,
    UPLOADS_PART,
    RepositorySet,
    database_tag,
    list_parts,
    list_sets,
    merge_parts,
    server_tag,
)
from worker.settings import Settings


def unlock_stale(restic: Restic) -> None:
    """Remove locks of restic processes that died (`restic unlock` leaves live ones alone)."""
    restic.run(["unlock"])


def keep_arguments(settings: Settings) -> list[str]:
    """restic's `forget` options from REPOSITORY_KEEP_* (a rule of 0 or "" is left out)."""
    policy: dict[str, int | str] = {
        "--keep-within": settings.REPOSITORY_KEEP_WITHIN,
        "--keep-within-hourly": settings.REPOSITORY_KEEP_WITHIN_HOURLY,
        "--keep-within-daily": settings.REPOSITORY_KEEP_WITHIN_DAILY,
        "--keep-hourly": settings.REPOSITORY_KEEP_HOURLY,
        "--keep-daily": settings.REPOSITORY_KEEP_DAILY,
        "--keep-weekly": settings.REPOSITORY_KEEP_WEEKLY,
        "--keep-monthly": settings.REPOSITORY_KEEP_MONTHLY,
        "--keep-yearly": settings.REPOSITORY_KEEP_YEARLY,
    }
    return [part for flag, rule in policy.items() if rule for part in (flag, str(rule))]


@dataclass(frozen=True)
class Retention:
    forgotten: list[str]  # short ids
    listed: list[RepositorySet]  # the database's sets as listed before forgetting
    kept: set[str]  # the timestamps of the sets left


def forget(restic: Restic, settings: Settings, database: str, server: str | None,
           keep: list[str] | None = None) -> Retention:
    """Apply the calendar policy to this server's sets of this database (restic's semantics: the newest
    set of each period that has one, in one group per server and database). The policy runs on the
    database parts (tag filter: this tool, this database, this server, `part:database`); uploads parts
    then follow their database part, so a set is kept or forgotten whole. Uploads parts left by failed
    runs go too, once a newer set exists. The newest set always stays. Another server's sets, and sets
    made before sets named their server (whose they are is unknown), are never touched; with no known
    server (`server` None) nothing is. `keep`: restic's `--keep-*` options (default: REPOSITORY_KEEP_*)."""
    parts = [item for item in list_parts(restic, database) if server is not None and item.server == server]
    sets = merge_parts(parts)
    removed: list[str] = []
    if len(sets) > 1 and server is not None:
        newest = sets[-1].id
        result = restic.json([
            "forget", "--tag", f"{TOOL_TAG},{database_tag(database)},{server_tag(server)},part:{DATABASE_PART}",
            "--group-by", "", *(keep if keep is not None else keep_arguments(settings)),
        ]) or []
        for group in result:
            removed += [str(item["id"]) for item in group.get("remove") or []]
        if newest in removed:  # restic never does this with a keep-* of at least 1; fail loudly if it ever did
            raise RepositoryError(f"retention removed the newest set {newest[:8]} of {database!r}; this is a bug")
    kept = {item.key for item in sets if item.id not in removed}
    newest_timestamp = sets[-1].timestamp if sets else ""
    followers = [item.id for item in parts if item.part == UPLOADS_PART and item.key not in kept
                 and item.timestamp < newest_timestamp]
    if followers:
        restic.run(["forget", *followers])
        removed += followers
    return Retention([identifier[:8] for identifier in removed], sets, {timestamp for _, _, timestamp in kept})


def retain(settings: Settings, database: str, server: str | None, owner: str, sent: list[dict[str, Any]],
           progress: Progress = no_progress) -> dict[str, Any]:
    """The prune link's share in the repository: record what each set this run sent added (a tag:
    restic 0.14 keeps no such figure, and it is known only once the set is written; `restic tag`
    rewrites the snapshot under a new id), then calendar retention for this database, whose listing is
    handed over to the next run's offsite link. Returns the sets' final ids and the ids forgotten."""
    restic = Restic(settings)
    with using_repository(settings, owner, progress):
        for item in sent:
            restic.run(["tag", "--add", f"added:{int(item['bytes_added'])}", str(item["set"])])
        progress("forgetting old sets", {})
        retention = forget(restic, settings, database, server)
        handover.hand_over(settings, database, server, retention.kept)
    by_timestamp = {found.timestamp: found.short_id for found in retention.listed}
    renamed = {str(item["set"]): by_timestamp.get(str(item["timestamp"]), str(item["set"])) for item in sent}
    return {"renamed": renamed, "forgotten": retention.forgotten}


def init(settings: Settings) -> dict[str, Any]:
    """Create the repository (never implicitly: only this command does)."""
    restic = Restic(settings)
    try:
        restic.run(["cat", "config"])
    except RepositoryMissing:
        pass
    else:
        raise RepositoryError(f"a repository already exists at {restic.shown}; nothing was changed")
    created = restic.run(["init"]).stdout  # restic 0.14's `init` prints text: "created restic repository ID at …"
    found = re.search(r"created restic repository ([0-9a-f]+)", created)
    return {"repository": restic.shown, "id": found.group(1) if found else ""}


def prune(settings: Settings, owner: str, progress: Progress = no_progress) -> dict[str, Any]:
    """Forget per the policy for every server's sets of every database, then reclaim the space (`restic
    prune`). `forgotten`: {database: short ids} (all its servers')."""
    restic = Restic(settings)
    started = time.monotonic()
    with using_repository(settings, owner, progress):
        unlock_stale(restic)
        groups = sorted({(found.database, found.server) for found in list_sets(restic) if found.server is not None})
        forgotten: dict[str, list[str]] = {}
        for database, server in groups:
            forgotten.setdefault(database, []).extend(forget(restic, settings, database, server).forgotten)
        progress("pruning the repository", {})
        prune_started = time.monotonic()
        restic.run(["prune"])
        pruned = time.monotonic() - prune_started
    return {"repository": restic.shown, "forgotten": forgotten, "prune_seconds": round(pruned, 3),
            "seconds": round(time.monotonic() - started, 3)}


def check(settings: Settings, owner: str, subset: str | None = None, progress: Progress = no_progress) -> dict[str, Any]:
    """`restic check` (structure and indexes), reading `subset` of the data too when given (`5%`, `1/7`)."""
    restic = Restic(settings)
    started = time.monotonic()
    with using_repository(settings, owner, progress):
        unlock_stale(restic)
        progress("checking the repository", {"subset": subset})
        restic.run(["check", *(["--read-data-subset", subset] if subset else [])])
    return {"repository": restic.shown, "subset": subset, "ok": True, "seconds": round(time.monotonic() - started, 3)}
