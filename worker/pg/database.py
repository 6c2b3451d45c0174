"""Talking to PostgreSQL with psycopg: connections, versions, an exported snapshot, exact row counts.

Names reach SQL only through `psycopg.sql.Identifier`; passwords only as connection parameters.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from worker.archive.meta import table_key
from worker.errors import BackupError, first_line
from worker.pg.environment import ssl_note

APPLICATION_NAME = "tma-backup"

_USER_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""


# Every relation a database-wide ANALYZE would analyze (catalogs included), largest first.
_ANALYZABLE = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 'p')
  AND c.relpersistence <> 't'
ORDER BY pg_total_relation_size(c.oid) DESC, n.nspname, c.relname
"""


def connect(connect_kwargs: dict[str, Any], database: str, **options: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            dbname=database,
            application_name=APPLICATION_NAME,
            connect_timeout=10,
            **{key: value for key, value in connect_kwargs.items() if value is not None},
            **options,
        )
    except (psycopg.Error, UnicodeError) as error:  # UnicodeError: a host name IDNA cannot encode
        # A TLS failure names the setting that asked for it (DB_SSLMODE, and DB_SSLROOTCERT when given).
        said = first_line(error)
        raise BackupError(f"cannot connect to database {database!r}: {said}{ssl_note(connect_kwargs, said)}") from None


def server_major(connection: psycopg.Connection[Any]) -> int:
    return connection.info.server_version // 10000


def server_version_text(connection: psycopg.Connection[Any]) -> str:
    return str(connection.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]


@contextmanager
def exported_snapshot(connection: psycopg.Connection[Any], lock_timeout: str) -> Iterator[str]:
    """A SERIALIZABLE READ ONLY DEFERRABLE transaction whose snapshot pg_dump imports.

    The transaction stays open until the block ends, which must be after pg_dump has finished.
    `lock_timeout` bounds how long our own row counting waits for a table lock, as pg_dump's
    --lock-wait-timeout does for pg_dump."""
    connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    connection.read_only = True
    connection.deferrable = True
    with connection.transaction():
        snapshot = connection.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        connection.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
        yield str(snapshot)


def user_tables(connection: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(schema, table) for schema, table in connection.execute(_USER_TABLES).fetchall()]


def exact_row_counts(connection: psycopg.Connection[Any]) -> dict[str, int]:
    """`count(*)` of every user table in every schema (pgboss included), in the current transaction."""
    return {table_key(schema, table): count_rows(connection, schema, table) for schema, table in user_tables(connection)}


def count_rows(connection: psycopg.Connection[Any], schema: str, table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    return int(connection.execute(query).fetchone()[0])  # type: ignore[index]


def analyze_and_count(connect_kwargs: dict[str, Any], database: str, jobs: int) -> dict[str, int]:
    """What a database-wide `ANALYZE` does, plus the exact `count(*)` of every user table, spread over
    `jobs` sessions, largest relation first. After a restore the server is idle but for us, and one
    session would leave the other cores unused for the seconds these scans take."""
    with connect(connect_kwargs, database, autocommit=True) as connection:
        tables = user_tables(connection)
        counted = set(tables)
        work: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        for relation in connection.execute(_ANALYZABLE).fetchall():
            work.put((relation[0], relation[1]))

    def drain() -> dict[str, int]:
        counts: dict[str, int] = {}
        with connect(connect_kwargs, database, autocommit=True) as session:
            while True:
                try:
                    schema, table = work.get_nowait()
                except queue.Empty:
                    return counts
                session.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)))
                if (schema, table) in counted:
                    counts[table_key(schema, table)] = count_rows(session, schema, table)

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="analyze") as pool:
        results = [future.result() for future in [pool.submit(drain) for _ in range(max(1, jobs))]]
    merged = {key: value for result in results for key, value in result.items()}
    return {key: merged[key] for key in (table_key(schema, table) for schema, table in tables) if key in merged}
