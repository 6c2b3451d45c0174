"""A scheduled run with nothing to do: when neither the database's data nor the uploads changed since
the last set, no set is made; the run records that it checked.

How "unchanged" is told (DESIGN: frequent sets):
- **the database**: PostgreSQL's own cumulative counters per table (`pg_stat_user_tables`: rows
  inserted, updated, deleted), each table's file (`relfilenode`: TRUNCATE and rewrites change it), the
  counters' reset time, and the catalogue rows of the database's own objects (the `xmin` of their
  `pg_class`, `pg_attribute`, `pg_proc`, `pg_constraint`, `pg_index`, `pg_attrdef`, `pg_trigger`,
  `pg_type` and `pg_namespace` rows: any DDL writes one). Tables that change on their own without a
  user doing anything are left out of the counters (BACKUP_UNCHANGED_IGNORE: TMA Cloud's pg-boss queue
  and its clients' heartbeats): their rows in a set may then be some minutes older, which a job queue
  and a heartbeat survive. A backend reports its counters when its transaction ends (at the latest
  when it next goes idle): a change not yet reported is taken by the next run, never lost.
- **the uploads**: every entry of TMA Cloud's in UPLOAD_DIR (path, size, modification time in ns,
  inode), as `stat` shows them. With STORAGE_DRIVER=s3 the bucket is not listed here: every run takes
  a set (its mirror is incremental anyway).
- a server whose sessions count no rows (`track_counts = off`, for the server or the database) cannot
  tell: every run takes a set.

The fingerprint of a run is taken at the start of its dump link, *before* the dump's snapshot: a change
between the two is in the set and makes the next fingerprint differ (one set too many, never one too
few). A run is skipped only when the last good run's record (written by its prune link, once the set is
complete here and, with a repository, confirmed off site) names the newest complete local backup and
its fingerprint equals the one taken now.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from worker.archive import catalogue
from worker.archive.meta import write_atomically
from worker.errors import BackupError
from worker.pg.database import connect
from worker.settings import Settings
from worker.uploads.config import uploads_enabled
from worker.uploads.swap import is_tmas

if TYPE_CHECKING:  # `status` reads the record and must not pay for Redis and the executors
    from worker.coordination.locks import DatabaseLock
    from worker.pg.executors import Executor

RECORD_PREFIX = ".last-set-"
_COUNTERS = ("SELECT s.schemaname, s.relname, c.relfilenode, s.n_tup_ins, s.n_tup_upd, s.n_tup_del"
             " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid ORDER BY 1, 2")
_CATALOGUE = """
SELECT 'class', c.oid::text, c.xmin::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
UNION ALL SELECT 'attribute', a.attrelid::text || '.' || a.attnum, a.xmin::text FROM pg_attribute a
 JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
UNION ALL SELECT 'proc', p.oid::text, p.xmin::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'constraint', o.oid::text, o.xmin::text FROM pg_constraint o JOIN pg_namespace n ON n.oid = o.connamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'index', i.indexrelid::text, i.xmin::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'attrdef', d.oid::text, d.xmin::text FROM pg_attrdef d
UNION ALL SELECT 'trigger', t.oid::text, t.xmin::text FROM pg_trigger t
UNION ALL SELECT 'type', t.oid::text, t.xmin::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
UNION ALL SELECT 'namespace', n.oid::text, n.xmin::text FROM pg_namespace n
ORDER BY 1, 2
"""


def _ignored(schema: str, table: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(f"{schema}.{table}", pattern) for pattern in patterns)


def database_fingerprint(connection: psycopg.Connection[Any], ignore: list[str]) -> str:
    """The database's change fingerprint (see the module's docstring); `connection` in autocommit."""
    digest = hashlib.sha256()
    for schema, table, filenode, inserted, updated, deleted in connection.execute(_COUNTERS).fetchall():
        counted = "-" if _ignored(schema, table, ignore) else f"{inserted}/{updated}/{deleted}"
        digest.update(f"{schema}\0{table}\0{filenode}\0{counted}\n".encode())
    reset = connection.execute("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()").fetchone()
    digest.update(f"reset {reset[0] if reset else None}\n".encode())
    for kind, name, xmin in connection.execute(_CATALOGUE).fetchall():
        digest.update(f"{kind} {name} {xmin}\n".encode())
    return digest.hexdigest()


def uploads_fingerprint(folder: Path) -> str:
    """UPLOAD_DIR's fingerprint: every entry of TMA Cloud's (the tool's own and `lost+found` left out)."""
    digest = hashlib.sha256()
    for directory, folders, files in os.walk(folder):
        if Path(directory) == folder:
            folders[:] = [name for name in folders if is_tmas(name)]
            files = [name for name in files if is_tmas(name)]
        folders.sort()
        for name in sorted(files):
            path = Path(directory) / name
            try:
                seen = os.lstat(path)
            except FileNotFoundError:
                continue
            relative = path.relative_to(folder).as_posix()
            digest.update(f"{relative}\0{seen.st_size}\0{seen.st_mtime_ns}\0{seen.st_ino}\n".encode())
    return digest.hexdigest()


def counts_rows(connection: psycopg.Connection[Any]) -> bool:
    """Whether this database's sessions count the rows they write (`track_counts`, on by default; off in
    the server's configuration or for the database, the counters never move and every change would look
    like none)."""
    row = connection.execute("SELECT current_setting('track_counts')").fetchone()
    return row is not None and row[0] == "on"


def fingerprint(settings: Settings, connection: psycopg.Connection[Any], database: str) -> str | None:
    """The run's fingerprint: the database's and, when the set takes them, the uploads'; None when
    "unchanged" cannot be told (TMA Cloud's bucket: STORAGE_DRIVER=s3; a server that counts no rows)."""
    if not counts_rows(connection):
        return None
    parts = [database_fingerprint(connection, settings.unchanged_ignore)]
    if uploads_enabled(settings, database):
        if settings.STORAGE_DRIVER != "local" or settings.UPLOAD_DIR is None:
            return None
        parts.append(uploads_fingerprint(settings.UPLOAD_DIR))
    return "+".join(parts)


def _record_path(settings: Settings, database: str, server: str | None) -> Path:
    key = hashlib.sha256(f"{database}\0{server}".encode()).hexdigest()[:24]
    return settings.backup_dir / f"{RECORD_PREFIX}{key}.json"


def record_set(settings: Settings, database: str, server: str | None, timestamp: str, change: str | None,
               off_site: bool) -> None:
    """The prune link of a good run: this set, complete here (and off site, `off_site`), with its fingerprint."""
    body = {"database": database, "server": server, "timestamp": timestamp, "fingerprint": change,
            "off_site": off_site, "checked_at": None}
    try:
        write_atomically(_record_path(settings, database, server), json.dumps(body))
    except OSError:
        pass  # no record: the next run takes a set, as it would have before


def read_record(settings: Settings, database: str, server: str | None) -> dict[str, Any] | None:
    try:
        body = json.loads(_record_path(settings, database, server).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("database") == database else None


def nothing_to_do(settings: Settings, executor: Executor, database: str, server: str | None) -> dict[str, Any] | None:
    """`unchanged_since_last_set` on a connection of its own; None (take a set) when skipping is off
    (BACKUP_SKIP_UNCHANGED) or the database cannot be asked (the run then says what is wrong)."""
    if not settings.BACKUP_SKIP_UNCHANGED:
        return None
    try:
        with connect(executor.connect_kwargs(), database, autocommit=True) as connection:
            return unchanged_since_last_set(settings, connection, database, server)
    except (BackupError, psycopg.Error):
        return None


def release_if_unchanged(settings: Settings, executor: Executor, database: str, server: str | None,
                         lock: DatabaseLock) -> dict[str, Any] | None:
    """For a run that holds `lock`: when nothing changed since the last set, release the lock and return
    that set's record (the run makes no set); else keep the lock and return None. Released on any error."""
    try:
        unchanged = nothing_to_do(settings, executor, database, server)
    except BaseException:
        lock.release()
        raise
    if unchanged is not None:
        lock.release()
    return unchanged


def unchanged_since_last_set(settings: Settings, connection: psycopg.Connection[Any], database: str,
                             server: str | None) -> dict[str, Any] | None:
    """The last set's record when nothing changed since it (and it is the newest complete local backup,
    and off site where there is a repository); the check is recorded in it. None: take a set."""
    record = read_record(settings, database, server)
    newest = catalogue.newest_complete(settings.backup_dir, database)
    if record is None or not record.get("fingerprint") or newest is None or newest.timestamp != record["timestamp"]:
        return None
    if settings.repository and not record.get("off_site"):
        return None
    if fingerprint(settings, connection, database) != record["fingerprint"]:
        return None
    record["checked_at"] = catalogue.utc_timestamp()
    record["checked_at_epoch"] = time.time()
    try:
        write_atomically(_record_path(settings, database, server), json.dumps(record))
    except OSError:
        return None  # a check that cannot be recorded is no check: take a set
    return record
