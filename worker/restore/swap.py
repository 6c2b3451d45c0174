"""Databases around a restore: scratch copies, the atomic swap by rename, kept previous copies.

Every database this tool creates carries a comment (`tma-backup:<role>:<live database>:<run>`) so that
leftovers are found by what they are, not by guessing from names. All names reach SQL through
`psycopg.sql.Identifier`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from worker.errors import BackupError
from worker.faults import crash_point
from worker.pg.database import connect

MAINTENANCE_DB = "postgres"
COMMENT_PREFIX = "tma-backup"
SCRATCH, KEPT, DRILL = "scratch", "previous", "drill"
KEPT_AT = "@"  # a kept copy's comment ends `<run>@<when it was kept, ns>` (run ids hold no `@`)
MAX_NAME_BYTES = 63


@dataclass(frozen=True)
class DatabaseShape:
    """What a replacement must keep of the live database."""

    encoding: str
    collate: str
    ctype: str
    owner: str
    allow_connections: bool


@dataclass(frozen=True)
class ManagedDatabase:
    name: str
    role: str
    live: str
    run: str
    kept_at: int = 0  # a kept copy: when it was kept (ns since the epoch); 0 for one kept before this was recorded


def admin_connection(connect_kwargs: dict[str, Any], live: str) -> psycopg.Connection[Any]:
    """A session outside the database being replaced: `postgres`, or `template1` when `postgres` is the
    one being restored (a session cannot rename the database it is connected to)."""
    return connect(connect_kwargs, MAINTENANCE_DB if live != MAINTENANCE_DB else "template1", autocommit=True)


def fit_name(name: str) -> str:
    """PostgreSQL truncates names past 63 bytes; shorten ourselves, keeping a hash for uniqueness."""
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name.encode()[: MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def scratch_name(role: str) -> str:
    return f"tma_{role}_{uuid.uuid4().hex[:16]}"


def kept_name(live: str, timestamp: str, kind: str = "pre_restore") -> str:
    return fit_name(f"{live}__{kind}_{timestamp}")


def free_kept_name(admin: psycopg.Connection[Any], live: str, timestamp: str, kind: str = "pre_restore") -> str:
    """`kept_name`, made unique when a copy of the same second exists (two swaps within one second)."""
    name, number = kept_name(live, timestamp, kind), 1
    while shape_of(admin, name) is not None:
        number += 1
        name = kept_name(live, f"{timestamp}_{number}", kind)
    return name


def shape_of(admin: psycopg.Connection[Any], database: str) -> DatabaseShape | None:
    row = admin.execute(
        "SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, r.rolname, d.datallowconn"
        " FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = %s",
        (database,),
    ).fetchone()
    return DatabaseShape(*row) if row else None


def comment(role: str, live: str, run: str) -> str:
    return f"{COMMENT_PREFIX}:{role}:{live}:{run}"


def create_database(admin: psycopg.Connection[Any], name: str, shape: DatabaseShape) -> None:
    """An empty database with the given encoding, collation, ctype and owner."""
    admin.execute(
        sql.SQL("CREATE DATABASE {} WITH TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {} OWNER {}").format(
            sql.Identifier(name), sql.Literal(shape.encoding), sql.Literal(shape.collate),
            sql.Literal(shape.ctype), sql.Identifier(shape.owner),
        )
    )


def create_like(admin: psycopg.Connection[Any], name: str, shape: DatabaseShape, role: str, live: str, run: str) -> None:
    """An empty database shaped like the live one, marked as this tool's (`role`) for `live`."""
    create_database(admin, name, shape)
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment(role, live, run))))


def drop(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def parse_comment(description: str | None) -> tuple[str, str, str] | None:
    """(role, live database, run) of a comment this tool wrote (`comment()`), None for any other."""
    if not description or not description.startswith(COMMENT_PREFIX + ":"):
        return None
    parts = description.split(":", 2)
    if len(parts) < 3:
        return None
    live, _, run = parts[2].rpartition(":")
    return (parts[1], live, run) if live else None


def made_by_us(admin: psycopg.Connection[Any], role: str) -> list[ManagedDatabase]:
    """Databases this tool made in `role`, for any live database, oldest first (by creation order of
    their oid)."""
    rows = admin.execute(
        "SELECT d.datname, s.description FROM pg_database d"
        " JOIN pg_shdescription s ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass"
        " WHERE s.description LIKE %s ORDER BY d.oid",
        (f"{COMMENT_PREFIX}:{role}:%",),
    ).fetchall()
    found = []
    for name, description in rows:
        parsed = parse_comment(description)
        if parsed is not None and parsed[0] == role:
            run, _, kept_at = parsed[2].partition(KEPT_AT)
            found.append(ManagedDatabase(name, role, parsed[1], run, int(kept_at) if kept_at.isdigit() else 0))
    return found


def managed(admin: psycopg.Connection[Any], live: str, role: str) -> list[ManagedDatabase]:
    """Databases this tool made for `live` in `role`, oldest first: by creation order of their oid, and
    kept copies by when they were kept (a rollback brings back an older database, which a restore may
    then keep again: the newest kept is not the newest created)."""
    mine = [database for database in made_by_us(admin, role) if database.live == live]
    return sorted(mine, key=lambda database: database.kept_at) if role == KEPT else mine


def drop_leftover_scratches(admin: psycopg.Connection[Any], live: str) -> list[str]:
    """Scratch and drill databases of `live` left by a crashed run. Call only while holding its lock."""
    dropped = []
    for role in (SCRATCH, DRILL):
        for leftover in managed(admin, live, role):
            drop(admin, leftover.name)
            dropped.append(leftover.name)
    return dropped


SWAP_MARKER = "tma_backup.swap_in_progress"


def mark_swapping(admin: psycopg.Connection[Any], database: str, run: str) -> None:
    """Remember, on the database itself, that we are about to make it refuse connections: a crash
    leaves this mark, and only a marked database is ever re-enabled by `repair_refused_connections`
    (an operator's own ALLOW_CONNECTIONS false is left alone)."""
    admin.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
        sql.Identifier(database), sql.Identifier(*SWAP_MARKER.split(".")), sql.Literal(run)))


def clear_mark(admin: psycopg.Connection[Any], database: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RESET {}").format(
        sql.Identifier(database), sql.Identifier(*SWAP_MARKER.split("."))))


def is_marked(admin: psycopg.Connection[Any], database: str) -> bool:
    row = admin.execute(
        "SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
        " WHERE d.datname = %s AND s.setrole = 0 AND EXISTS ("
        "  SELECT 1 FROM unnest(s.setconfig) c WHERE c LIKE %s)",
        (database, SWAP_MARKER + "=%"),
    ).fetchone()
    return row is not None


def repair_refused_connections(admin: psycopg.Connection[Any], live: str) -> bool:
    """A crash between 'refuse connections' and the end of the swap leaves the live database marked and
    refusing them. Re-enable it and clear the mark. Returns True when it repaired."""
    shape = shape_of(admin, live)
    if shape is None or not is_marked(admin, live):
        return False
    set_allow_connections(admin, live, True)
    clear_mark(admin, live)
    return True


def terminate_sessions(admin: psycopg.Connection[Any], database: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()[0]  # type: ignore[index]
        if remaining == 0:
            return
        if time.monotonic() > deadline:
            raise BackupError(f"sessions on {database!r} did not end within {timeout:.0f}s")
        time.sleep(0.1)


def set_allow_connections(admin: psycopg.Connection[Any], database: str, allow: bool) -> None:
    admin.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(database), sql.SQL("true" if allow else "false")
        )
    )


def database_comment(admin: psycopg.Connection[Any], database: str) -> str | None:
    row = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                        (database,)).fetchone()
    return row[0] if row else None


def swap_in(admin: psycopg.Connection[Any], live: str, replacement: str, kept: str, run: str) -> None:
    """Refuse new sessions on `live`, end its sessions, then in ONE transaction rename live → kept and
    replacement → live. There is never a moment without a live database. On failure before the
    commit, `live` accepts connections again and is exactly as it was. The live database's own comment
    moves to its replacement (a dump without --create does not hold it); the kept copy gets our marker."""
    live_comment = database_comment(admin, live)
    mark_swapping(admin, live, run)
    set_allow_connections(admin, live, False)
    crash_point("swap:connections-refused")
    try:
        terminate_sessions(admin, live)
        with admin.transaction():
            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(live), sql.Identifier(kept)))
            crash_point("swap:between-renames")
            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(replacement), sql.Identifier(live)))
            admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(live), sql.Literal(live_comment)))
            admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(kept), sql.Literal(comment(KEPT, live, f"{run}{KEPT_AT}{time.time_ns()}"))))
    except BaseException:
        if shape_of(admin, live) is not None:
            set_allow_connections(admin, live, True)
            clear_mark(admin, live)
        raise
    clear_mark(admin, kept)


_LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}
_DATABASE_PRIVILEGES = {"CONNECT", "CREATE", "TEMPORARY"}


@dataclass(frozen=True)
class DatabaseAccess:
    """What a dump of one database cannot hold: its `ALTER DATABASE … SET` values (never our swap
    marker), its GRANTs (None: the default privileges, datacl NULL) and its comment."""

    settings: tuple[tuple[str, tuple[str, ...]], ...]
    grants: tuple[tuple[str | None, str, bool], ...] | None
    comment: str | None


def read_database_access(admin: psycopg.Connection[Any], database: str) -> DatabaseAccess:
    """The settings, GRANTs (CONNECT, CREATE and TEMPORARY; not the owner's own) and comment of
    `database`, to be applied to its replacement by `apply_database_access`."""
    rows = admin.execute(
        "SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
        " WHERE d.datname = %s AND s.setrole = 0", (database,)).fetchall()
    settings = []
    for (entry,) in rows:
        name, _, value = entry.partition("=")
        if name == SWAP_MARKER:
            continue
        parts = tuple(part.strip() for part in value.split(",")) if name in _LIST_SETTINGS else (value,)
        settings.append((name, parts))
    has_acl = admin.execute("SELECT datacl IS NOT NULL FROM pg_database WHERE datname = %s", (database,)).fetchone()
    grants = None
    if has_acl and has_acl[0]:
        rows = admin.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable"
            " FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s AND a.grantee <> d.datdba", (database,)).fetchall()
        grants = tuple((grantee, privilege, grantable) for grantee, privilege, grantable in rows
                       if privilege in _DATABASE_PRIVILEGES)
    return DatabaseAccess(tuple(settings), grants, database_comment(admin, database))


def apply_database_settings(admin: psycopg.Connection[Any], database: str, access: DatabaseAccess) -> None:
    """The `ALTER DATABASE … SET` values of `access`, on `database`."""
    for name, parts in access.settings:
        admin.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
            sql.Identifier(database), sql.Identifier(*name.split(".")), sql.SQL(", ").join(map(sql.Literal, parts))))


def apply_database_access(admin: psycopg.Connection[Any], database: str, access: DatabaseAccess,
                          with_settings: bool = True, with_comment: bool = True) -> None:
    """Give `database` (a replacement, freshly created) the settings, GRANTs and comment read from the
    live database. The swap moves the comment itself, at the rename (`with_comment=False`); an in-place
    restore gives the settings only after pg_restore (`with_settings=False`, then
    `apply_database_settings`): one like `default_transaction_read_only` would make it fail."""
    if with_settings:
        apply_database_settings(admin, database, access)
    target_id = sql.Identifier(database)
    if access.grants is not None:
        admin.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(target_id))
        for grantee, privilege, grantable in access.grants:
            admin.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), target_id, sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    if with_comment:
        admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(target_id, sql.Literal(access.comment)))


def trim_kept(admin: psycopg.Connection[Any], live: str, keep: int) -> list[str]:
    """Drop kept previous copies of `live` beyond the newest `keep`."""
    kept = managed(admin, live, KEPT)
    doomed = kept[: max(len(kept) - keep, 0)]
    for database in doomed:
        drop(admin, database.name)
    return [database.name for database in doomed]
