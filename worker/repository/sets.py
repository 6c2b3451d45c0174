"""Sets in the repository: one restic snapshot per backup, found by its tags.

A set is one restic snapshot per backup, its *database part*: the backup's `.dump` (or `.dump.zst`),
its `.meta` and, with uploads, the configuration file (`<name>.env`), at the root of the snapshot's
tree, so `restic restore ID --target DIR` gives those files and nothing else. With uploads it has a
second snapshot, its *uploads part*: UPLOAD_DIR's content at the root of its tree. Their tags say what
they are: `tma-backup`, `db:<database>` (percent-encoded: restic splits tags at commas), `server:<the
database server's identity>` (`pg-<system_identifier>`), `at:<backup timestamp>`, `run:<run id>`,
`part:database` or `part:uploads`, `size:<bytes>` (the database part: its backup file's size, so a fetch
checks its room without listing the set) and `added:<bytes>` (what it added to the repository), so listing
and retention never touch snapshots this tool did not make. Both parts of a set carry the same `at:` tag
and time.

A set names its server because two servers may share a repository with databases of the same name
(production and staging, both with TMA's default name): retention, `latest`, status and the catch-up
rule work on this server's sets only. Sets made before sets named their server have no `server:` tag:
they are listed and restorable by id, taken as this server's by `latest` and the catch-up rule when it
has none of its own, and never forgotten by retention (which cannot tell whose they are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, unquote

from worker.archive import catalogue
from worker.repository.restic import RepositoryError, Restic

TOOL_TAG = "tma-backup"
DATABASE_PART = "database"
UPLOADS_PART = "uploads"
RESTIC_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # restic backup --time: a set's time is its backup's timestamp


def database_tag(database: str) -> str:
    return "db:" + quote(database, safe="")


def server_tag(server: str) -> str:
    return "server:" + quote(server, safe="")


def set_tags(database: str, timestamp: str, run_id: str, server: str | None) -> list[str]:
    return [TOOL_TAG, database_tag(database), *([server_tag(server)] if server else []), f"at:{timestamp}",
            f"run:{quote(run_id, safe='')}"]


@dataclass(frozen=True)
class RepositorySet:
    id: str
    database: str
    timestamp: str  # the backup's own (catalogue) timestamp
    run_id: str
    time: datetime
    host: str
    bytes_added: int | None
    files: list[str] = field(default_factory=list)  # the snapshot's top-level names
    part: str = DATABASE_PART
    uploads: str | None = None  # the uploads part's id, when the set has one
    dump_bytes: int | None = None  # the backup file's size (tag `size:`), which a fetch needs room for
    server: str | None = None  # the database server's identity (tag `server:`); None: a set made before the tag
    tree: str = ""  # the snapshot's tree: its content's id (equal in a copy made with the same chunker parameters)
    tma_migration: str | None = None  # TMA Cloud's newest migration in the set's database (tag `tma:`)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def key(self) -> tuple[str | None, str, str]:
        """What the two parts of one set share: server, database, backup timestamp."""
        return self.server, self.database, self.timestamp

    @property
    def dump_name(self) -> str | None:
        names = [name for name in self.files if name.endswith((catalogue.DUMP_SUFFIX, catalogue.ZST_DUMP_SUFFIX))]
        return names[0] if len(names) == 1 else None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.short_id,
            "database": self.database,
            "timestamp": self.timestamp,
            "run_id": self.run_id,
            "host": self.host,
            "server": self.server,
            "tma_migration": self.tma_migration,
            "bytes_added": self.bytes_added,
            "files": self.files,
            "uploads": self.uploads[:8] if self.uploads else None,
        }


def _tag_value(tags: list[str], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return None


def parse_snapshot(snapshot: dict[str, Any]) -> RepositorySet | None:
    """A snapshot as one of our sets, or None when this tool did not make it."""
    tags = list(snapshot.get("tags") or [])
    database, timestamp = _tag_value(tags, "db:"), _tag_value(tags, "at:")
    if TOOL_TAG not in tags or database is None or timestamp is None:
        return None
    try:
        catalogue.parse_timestamp(timestamp)
    except ValueError:
        return None
    added, size, server = _tag_value(tags, "added:"), _tag_value(tags, "size:"), _tag_value(tags, "server:")
    paths = [str(path) for path in snapshot.get("paths") or []]
    return RepositorySet(
        id=str(snapshot["id"]),
        database=unquote(database),
        timestamp=timestamp,
        run_id=unquote(_tag_value(tags, "run:") or ""),
        time=_parse_time(str(snapshot.get("time", ""))),
        host=str(snapshot.get("hostname", "")),
        bytes_added=int(added) if added and added.isdigit() else None,
        files=sorted(path.rsplit("/", 1)[-1] for path in paths),
        part=_tag_value(tags, "part:") or DATABASE_PART,
        dump_bytes=int(size) if size and size.isdigit() else None,
        server=unquote(server) if server else None,
        tree=str(snapshot.get("tree", "")),
        tma_migration=unquote(migration) if (migration := _tag_value(tags, "tma:")) else None,
    )


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)


def list_sets(restic: Restic, database: str | None = None) -> list[RepositorySet]:
    """Our sets (of one database, or all), oldest first. One set per backup timestamp: should a run
    have died between writing a set and tagging it, the tagged copy wins."""
    tag = f"{TOOL_TAG},{database_tag(database)}" if database is not None else TOOL_TAG
    return merge_parts([parsed for snapshot in restic.json(["snapshots", "--tag", tag]) or []
                        if (parsed := parse_snapshot(snapshot)) is not None])


def merge_parts(parts: list[RepositorySet]) -> list[RepositorySet]:
    """Sets from their parts: each database part, with the id of its uploads part when there is one.
    An uploads part without its database part (a run that failed after capturing) is no set."""
    found: dict[tuple[str | None, str, str], RepositorySet] = {}
    uploads: dict[tuple[str | None, str, str], RepositorySet] = {}
    for parsed in parts:
        key = parsed.key
        chosen = uploads if parsed.part == UPLOADS_PART else found
        if key not in chosen or (chosen[key].bytes_added is None and parsed.bytes_added is not None):
            chosen[key] = parsed
    sets = [replace(item, uploads=uploads[key].id if key in uploads else None) for key, item in found.items()]
    return sorted(sets, key=lambda item: (item.timestamp, item.database, item.server or ""))


def orphan_uploads(parts: list[RepositorySet]) -> list[RepositorySet]:
    """Uploads parts whose database part does not exist."""
    databases = {item.key for item in parts if item.part != UPLOADS_PART}
    return [item for item in parts if item.part == UPLOADS_PART and item.key not in databases]


def of_server(found: list[RepositorySet], server: str | None) -> list[RepositorySet]:
    """The sets `server` made, or, when it made none, the sets made before sets named their server
    (taken as its own, as they always were); never another server's."""
    mine = [item for item in found if item.server is not None and item.server == server]
    return mine or [item for item in found if item.server is None]


def list_parts(restic: Restic, database: str) -> list[RepositorySet]:
    snapshots = restic.json(["snapshots", "--tag", f"{TOOL_TAG},{database_tag(database)}"]) or []
    return [parsed for snapshot in snapshots if (parsed := parse_snapshot(snapshot)) is not None]


class NoSet(RepositoryError):
    """`latest` found no set of the database made by this server: nothing to restore or drill yet."""


def find_set(restic: Restic, reference: str, database: str | None, server: str | None = None) -> RepositorySet:
    """`latest` (the newest set of `database` that `server` made, see `of_server`) or a set's id or id
    prefix (at least 4 characters; any server's: how a new server restores an old one's set)."""
    sets = list_sets(restic, database if reference == "latest" else None)
    if reference == "latest":
        mine = of_server(sets, server)
        if not mine:
            others = sorted({item.server for item in sets if item.server})
            if others:
                newest = {name: max(item.timestamp for item in sets if item.server == name) for name in others}
                shown = ", ".join(f"{name} (newest {newest[name]})" for name in others)
                raise NoSet(
                    f"the repository holds no set of {database!r} made by {server}, only sets of other servers: "
                    f"{shown}; on a new server that takes over from one of them, add `--server {others[-1]}` (its "
                    f"newest) or give a set's id from `tma-backup repository list --database {database}`")
            raise NoSet(f"the repository holds no set of database {database!r}")
        return mine[-1]
    if len(reference) < 4 or any(char not in "0123456789abcdef" for char in reference.lower()):
        raise RepositoryError(f"{reference!r} is not a set id: give `latest` or an id from `tma-backup repository list`")
    matches = [item for item in sets if item.id.startswith(reference.lower())]
    if not matches:
        raise RepositoryError(f"no set {reference!r} in the repository (see `tma-backup repository list`)")
    if len(matches) > 1:
        raise RepositoryError(f"set id {reference!r} is ambiguous: give more of it")
    found = matches[0]
    if database is not None and found.database != database:
        raise RepositoryError(f"set {found.short_id} is a backup of {found.database!r}, not of {database!r}")
    return found


def find_latest_whole(restic: Restic, database: str | None, server: str | None) -> tuple[RepositorySet, list[RepositorySet]]:
    """`latest` for a restore that takes the uploads too: the newest set of `database` made by `server`
    that has its uploads part, and the newer sets passed over because they lack theirs (a run whose
    capture could not reach the repository sends its database part alone, and says so)."""
    mine = of_server(list_sets(restic, database), server)
    if not mine:
        return find_set(restic, "latest", database, server), []  # raises, naming the servers there are
    whole = [item for item in mine if item.uploads]
    if not whole:
        raise RepositoryError(f"no set of {database!r} made by {server} has its uploads (the newest, "
                              f"{mine[-1].short_id} of {mine[-1].timestamp}, lacks them: their capture failed); "
                              "restore the database alone, and back up again to make a whole set")
    return whole[-1], [item for item in mine if item.timestamp > whole[-1].timestamp]


def set_time(timestamp: str) -> str:
    """The backup's timestamp as `restic backup --time` takes it."""
    return catalogue.parse_timestamp(timestamp).strftime(RESTIC_TIME_FORMAT)


@dataclass(frozen=True)
class Listing:
    """What `restic ls --json` shows of one snapshot: its full id, its files (path from the snapshot's
    root: size) and its symbolic links."""

    id: str
    files: dict[str, int]
    links: list[str]


def list_files(restic: Restic, snapshot: str) -> Listing:
    identifier = ""
    files: dict[str, int] = {}
    links: list[str] = []
    for line in restic.run(["ls", "--json", snapshot]).stdout.splitlines():
        try:
            node = json.loads(line)
        except ValueError:
            continue
        if node.get("struct_type") == "snapshot":
            identifier = str(node.get("id", ""))
        elif node.get("struct_type") == "node":
            path = str(node.get("path", "")).lstrip("/")
            if node.get("type") == "file":
                files[path] = int(node.get("size", 0))  # restic leaves the size out of an empty file
            elif node.get("type") == "symlink":
                links.append(path)
    return Listing(identifier, files, links)
