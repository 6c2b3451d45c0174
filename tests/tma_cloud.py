"""A database shaped like TMA Cloud's: users, files with bytea, audit_log, sessions, share_links, a
`pgboss` schema with a job table, the `pg_trgm` extension and jsonb columns. Used by tests and bench."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    settings jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_name_trgm ON users USING gin (name gin_trgm_ops);
CREATE TABLE files (
    id bigserial PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES users(id),
    path text NOT NULL,
    mime text NOT NULL,
    content bytea,
    metadata jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_path_trgm ON files USING gin (path gin_trgm_ops);
CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    user_id bigint REFERENCES users(id),
    action text NOT NULL,
    details jsonb,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE sessions (
    sid text PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id),
    data jsonb NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE share_links (
    token text PRIMARY KEY,
    file_id bigint NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    expires_at timestamptz
);
CREATE SCHEMA pgboss;
CREATE TABLE pgboss.job (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    state text NOT NULL DEFAULT 'created',
    data jsonb,
    created_on timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pgboss.version (version int PRIMARY KEY);
INSERT INTO pgboss.version VALUES (20);
"""

TABLES = ["public.users", "public.files", "public.audit_log", "public.sessions", "public.share_links",
          "pgboss.job", "pgboss.version"]


def create_schema(connection: psycopg.Connection[Any]) -> None:
    connection.execute(SCHEMA)


def populate(connection: psycopg.Connection[Any], users: int = 50, files_per_user: int = 4,
             bytes_per_file: int = 2048) -> None:
    """Deterministic shapes, random (incompressible) bytea content."""
    connection.execute(
        "INSERT INTO users (email, name, settings) SELECT 'user' || g || '@example.com', 'User number ' || g,"
        " jsonb_build_object('theme', 'dark', 'quota', g * 1024) FROM generate_series(1, %s) g", (users,))
    connection.execute(
        "INSERT INTO files (owner_id, path, mime, content, metadata)"
        " SELECT u.id, '/home/' || u.id || '/file-' || f || '.bin', 'application/octet-stream',"
        " gen_random_bytes(least(%s, 1024)) || decode(repeat(md5(random()::text), %s), 'hex'),"
        " jsonb_build_object('tags', jsonb_build_array('a', 'b'), 'n', f)"
        " FROM users u, generate_series(1, %s) f",
        (bytes_per_file, max(bytes_per_file // 16, 1), files_per_user))
    connection.execute(
        "INSERT INTO audit_log (user_id, action, details) SELECT (g %% %s) + 1, 'login',"
        " jsonb_build_object('ip', '10.0.0.' || (g %% 250)) FROM generate_series(1, %s) g", (users, users * 5))
    connection.execute(
        "INSERT INTO sessions (sid, user_id, data, expires_at) SELECT md5(g::text), g,"
        " '{\"cart\": []}', now() + interval '1 day' FROM generate_series(1, %s) g", (users,))
    connection.execute(
        "INSERT INTO share_links (token, file_id) SELECT md5('s' || id), id FROM files WHERE id % 3 = 0")
    connection.execute(
        "INSERT INTO pgboss.job (name, data) SELECT 'thumbnail', jsonb_build_object('file', g)"
        " FROM generate_series(1, %s) g", (users * 2,))


def create_database(admin: psycopg.Connection[Any], name: str, **options: str) -> None:
    """`admin` must be in autocommit mode."""
    extra = sql.SQL(" ").join(
        sql.SQL("{} {}").format(sql.SQL(key.upper()), sql.Literal(value)) for key, value in options.items())
    admin.execute(sql.SQL("CREATE DATABASE {} {}").format(sql.Identifier(name), extra))


def create_populated(server: Any, name: str) -> str:
    """Create `name` on `server` (anything with `connect(dbname, **options)`: the private cluster or a
    container) shaped like TMA Cloud's, with data."""
    with server.connect(autocommit=True) as admin:
        create_database(admin, name)
    with server.connect(name, autocommit=True) as connection:
        create_schema(connection)
        populate(connection)
    return name


def drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def exact_counts(connection: psycopg.Connection[Any]) -> dict[str, int]:
    from worker.pg.database import exact_row_counts

    return exact_row_counts(connection)


def table_digests(connection: psycopg.Connection[Any]) -> dict[str, str]:
    """md5 of every table's rows in primary-key order: content, not just counts."""
    from worker.archive.meta import table_key
    from worker.pg.database import user_tables

    digests = {}
    for schema, table in user_tables(connection):
        query = sql.SQL("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t").format(
            sql.Identifier(schema, table))
        digests[table_key(schema, table)] = connection.execute(query).fetchone()[0]
    return digests
