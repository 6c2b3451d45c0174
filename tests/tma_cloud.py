"""A database shaped like TMA Cloud's: users, files with bytea, audit_log, sessions, share_links, a
`pgboss` schema with a job table, the `pg_trgm` extension and jsonb columns. Used by tests and bench.

`files` carries the columns of TMA Cloud's own that the uploads cross-check reads: `type` (`file` or
`folder`), `path` (the upload's key relative to UPLOAD_DIR, NULL for a folder), `size` (the plain size)
and `deleted_at` (set while the row is in the trash). `make_uploads` gives rows real blobs in an
UPLOAD_DIR, written as TMA Cloud writes them."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
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
    path text,
    mime text NOT NULL,
    content bytea,
    metadata jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    type text NOT NULL DEFAULT 'file',
    size bigint,
    deleted_at timestamptz
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


# ---------------------------------------------------------------------------------------------------
# Uploads: TMA Cloud's local storage driver (STORAGE_DRIVER=local, UPLOAD_DIR)

ENCRYPTION_OVERHEAD = 32  # AES-256-GCM as TMA Cloud stores a file: [16-byte IV][data][16-byte tag]
EXTENSIONS = (".pdf", ".jpg", ".png", ".txt", ".docx", ".zip", "")


@dataclass
class Uploads:
    """What `make_uploads` made: `sizes` maps every referenced path (trashed ones included) to the
    plain size its row records; `trashed` are the paths whose rows are in the trash."""

    folder: Path
    sizes: dict[str, int] = field(default_factory=dict)
    trashed: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return sorted(self.sizes)


def upload_name(rng: random.Random) -> str:
    """A key as TMA Cloud names an upload: a random hex id and the original extension."""
    return f"{rng.getrandbits(128):032x}{rng.choice(EXTENSIONS)}"


def write_blob(path: Path, plain_size: int, encrypted: bool = True) -> bytes:
    """Random bytes standing for an upload: IV + data + tag when `encrypted` (on disk exactly
    `plain_size + 32` bytes), else `plain_size` bytes. Returns what was written."""
    data = os.urandom(plain_size + (ENCRYPTION_OVERHEAD if encrypted else 0))
    path.write_bytes(data)
    return data


def make_uploads(connection: psycopg.Connection[Any], upload_dir: Path, n: int, encrypted: bool = True,
                 sizes: tuple[int, int] = (256, 4096), trashed: int = 3, seed: int | None = None) -> Uploads:
    """Make the database's `files` rows `n` uploads with their blobs in `upload_dir`, as TMA Cloud keeps
    them: `path` = `<random hex id><ext>`, `size` = the plain size, the blob `[IV][data][tag]` (32 bytes
    longer). Rows beyond `n` are deleted, missing ones added. The first `trashed` rows go to the trash
    (`deleted_at` set; their blobs stay, as in TMA Cloud until the purge) and one folder row
    (`type='folder'`, `path` NULL) is added. `connection` must be in autocommit mode."""
    rng = random.Random(seed)
    upload_dir.mkdir(parents=True, exist_ok=True)
    ids = [row[0] for row in connection.execute("SELECT id FROM files ORDER BY id").fetchall()]
    if len(ids) > n:
        connection.execute("DELETE FROM files WHERE id = ANY(%s)", (ids[n:],))
        ids = ids[:n]
    if len(ids) < n:
        owner = connection.execute("SELECT min(id) FROM users").fetchone()[0]
        added = connection.execute(
            "INSERT INTO files (owner_id, path, mime) SELECT %s, 'pending-' || g, 'application/octet-stream'"
            " FROM generate_series(1, %s) g RETURNING id", (owner, n - len(ids))).fetchall()
        ids += [row[0] for row in added]
    made = Uploads(upload_dir)
    rows = []
    for number, row_id in enumerate(ids):
        name = upload_name(rng)
        while name in made.sizes:
            name = upload_name(rng)
        plain = rng.randint(*sizes)
        write_blob(upload_dir / name, plain, encrypted)
        made.sizes[name] = plain
        rows.append((name, plain, number < trashed, row_id))
        if number < trashed:
            made.trashed.append(name)
    with connection.cursor() as cursor:
        cursor.executemany(
            "UPDATE files SET type = 'file', path = %s, size = %s,"
            " deleted_at = CASE WHEN %s THEN now() - interval '3 days' END WHERE id = %s", rows)
    connection.execute(
        "INSERT INTO files (owner_id, path, mime, type, size) SELECT min(id), NULL, 'inode/directory', 'folder', NULL"
        " FROM users")
    return made


def folder_digests(folder: Path, skip_ours: bool = True) -> dict[str, str]:
    """SHA-256 of every regular file under `folder` (relative POSIX path → hex digest), without
    following symbolic links; `skip_ours` leaves out tma-backup's own `.tma-*` entries at the top."""
    found = {}
    for directory, folders, files in os.walk(folder):
        if skip_ours and Path(directory) == folder:
            folders[:] = [name for name in folders if not name.startswith(".tma-")]
            files = [name for name in files if not name.startswith(".tma-")]
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
