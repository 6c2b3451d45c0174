"""TMA Cloud as the bench sees it: its database, its uploads, and what it does in 15 minutes."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from psycopg import sql

from bench import generate
from bench.frequent.measure import HOST, PORT, USER, connect, say
from bench.uploads import EXTENSIONS, TAG_OVERHEAD, sizes_for, write_random
from bench.vault import UPLOAD_MEAN_BYTES
from tests import tma_cloud

DATABASE = "tma_bench_frequent"
MARKER = "made by bench.frequent"  # COMMENT ON DATABASE: a database without it is never dropped
UPLOADS = 300  # files in UPLOAD_DIR; --uploads-mb sets their total
REFERENCE_MB = 1200  # --reference: bench.run's reference database, each `files` row with its upload

IDLE = {"pgboss.job updated": 3, "pgboss.job inserted": 1}
ACTIVITY = {
    "uploads added (files rows + blobs)": 10, "upload size (plain bytes)": "150-250 KB",
    "uploads deleted (blob + row, TMA's purge)": 2,
    "rows updated": {"files (rename: metadata)": 20, "users (settings)": 15, "sessions (touched)": 15},
    "rows inserted": {"audit_log": 40, "sessions (logins)": 5, "share_links": 3},
    "pg-boss": {"pgboss.job inserted": 30, "pgboss.job completed": 20},
}


class Site:
    def __init__(self, work: Path, uploads_mb: int, reference: bool = False):
        self.work, self.uploads_mb, self.reference = work, uploads_mb, reference
        self.upload_dir = work / "uploads"
        self.rng = random.Random(2424)  # not make_uploads' seed: its names would come again

    def create(self) -> dict[str, Any]:
        template = None
        if self.reference:  # bench.run's reference database, made once and reused; copied, never changed
            template = generate.ensure_database(generate.Server(HOST, int(PORT), USER), generate.default_name(REFERENCE_MB),
                                                REFERENCE_MB, log=say).name
        with connect() as admin:
            found = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                                  (DATABASE,)).fetchone()
            if found is not None and found[0] != MARKER:
                raise SystemExit(f"[ERROR] database {DATABASE} exists and bench.frequent did not make it: refusing to drop it")
            tma_cloud.drop_database(admin, DATABASE)
            if template is None:
                tma_cloud.create_database(admin, DATABASE)
            else:
                admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(DATABASE),
                                                                              sql.Identifier(template)))
            admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(DATABASE), sql.Literal(MARKER)))
        if template is not None:
            return self._give_uploads()
        average = self.uploads_mb * 1024 * 1024 // UPLOADS
        with connect(DATABASE) as connection:
            tma_cloud.create_schema(connection)
            tma_cloud.populate(connection, users=400, files_per_user=1)
            made = tma_cloud.make_uploads(connection, self.upload_dir, UPLOADS, sizes=(average // 5, average * 9 // 5),
                                          trashed=3, seed=24)
            rows = sum(connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*name.split("."))))
                       .fetchone()[0] for name in tma_cloud.TABLES)
            database_bytes = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        files, size = self.uploads()
        return {"rows": rows, "uploads": files, "uploads_bytes": size, "referenced": len(made.sizes),
                "database_bytes": database_bytes}

    def _give_uploads(self) -> dict[str, Any]:
        """The reference: every `files` row of the copy gets its upload, as section h. of bench.run gives them
        (bench.vault.UPLOAD_MEAN_BYTES on average, lognormal sizes, random bytes 32 longer than the plain size)."""
        rng = random.Random(22)
        self.upload_dir.mkdir(mode=0o700, parents=True)
        with connect(DATABASE) as connection:
            ids = [row[0] for row in connection.execute("SELECT id FROM files WHERE type = 'file' ORDER BY id")]
            sizes = sizes_for(len(ids), len(ids) * UPLOAD_MEAN_BYTES, rng)
            keys = [f"{rng.getrandbits(64):016x}{EXTENSIONS[number % len(EXTENSIONS)]}" for number in range(len(ids))]
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda pair: write_random(self.upload_dir / pair[0], pair[1]), zip(keys, sizes, strict=True)))
            with connection.transaction():
                connection.execute("CREATE TEMP TABLE uploads_map (id bigint, path text, size bigint)")
                with connection.cursor().copy("COPY uploads_map FROM STDIN") as copy:
                    for ident, key, size in zip(ids, keys, sizes, strict=True):
                        copy.write_row((ident, key, size - TAG_OVERHEAD))
                connection.execute("UPDATE files f SET path = m.path, size = m.size FROM uploads_map m WHERE f.id = m.id")
            connection.execute("VACUUM (FREEZE, ANALYZE) files")
            rows = sum(connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*name.split("."))))
                       .fetchone()[0] for name in tma_cloud.TABLES)
            database_bytes = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        files, size = self.uploads()
        return {"rows": rows, "uploads": files, "uploads_bytes": size, "referenced": len(ids),
                "database_bytes": database_bytes}

    def uploads(self) -> tuple[int, int]:
        entries = [entry for entry in os.scandir(self.upload_dir) if entry.is_file(follow_symlinks=False)
                   and not entry.name.startswith(".tma-")]
        return len(entries), sum(entry.stat().st_size for entry in entries)

    def idle(self) -> None:
        """TMA Cloud with no user: pg-boss's maintenance touches its job table (BACKUP_UNCHANGED_IGNORE)."""
        with connect(DATABASE) as connection:
            connection.execute("UPDATE pgboss.job SET state = CASE state WHEN 'created' THEN 'retry' ELSE 'created' END"
                               " WHERE id IN (SELECT id FROM pgboss.job ORDER BY created_on DESC LIMIT 3)")
            connection.execute("INSERT INTO pgboss.job (name, data) VALUES ('__pgboss__maintenance', '{}')")

    def activity(self) -> dict[str, int]:
        """ACTIVITY: a typical 15 minutes of TMA Cloud. Returns the bytes of uploads written and removed."""
        rng = self.rng
        added_bytes = removed_bytes = 0
        with connect(DATABASE) as connection:
            users = [row[0] for row in connection.execute("SELECT id FROM users ORDER BY id").fetchall()]
            new_files = []
            for _ in range(10):  # uploads: the blob first, then its row (as TMA Cloud writes them)
                name, plain = tma_cloud.upload_name(rng), rng.randint(150_000, 250_000)
                while (self.upload_dir / name).exists():
                    name = tma_cloud.upload_name(rng)
                tma_cloud.write_blob(self.upload_dir / name, plain)
                added_bytes += plain + tma_cloud.ENCRYPTION_OVERHEAD
                owner = rng.choice(users)
                new_files.append(connection.execute(
                    "INSERT INTO files (owner_id, path, mime, size, metadata) VALUES (%s, %s, 'application/octet-stream',"
                    " %s, jsonb_build_object('name', %s::text)) RETURNING id", (owner, name, plain, f"upload-{name[:8]}")).fetchone()[0])
                connection.execute("INSERT INTO audit_log (user_id, action, details) VALUES (%s, 'upload',"
                                   " jsonb_build_object('file', %s::text))", (owner, name))
            purged = connection.execute(  # the purge: blob, then row
                "SELECT id, path FROM files WHERE type = 'file' AND path IS NOT NULL AND NOT (id = ANY(%s))"
                " ORDER BY random() LIMIT 2", (new_files,)).fetchall()
            for row_id, path in purged:
                blob = self.upload_dir / path
                removed_bytes += blob.stat().st_size
                blob.unlink()
                connection.execute("DELETE FROM files WHERE id = %s", (row_id,))
                connection.execute("INSERT INTO audit_log (action, details) VALUES ('purge', jsonb_build_object('file', %s::text))",
                                   (path,))
            with connection.transaction():  # renames, settings, active sessions
                connection.execute("UPDATE files SET metadata = metadata || jsonb_build_object('name', 'renamed-' || id)"
                                   " WHERE id IN (SELECT id FROM files WHERE type = 'file' ORDER BY random() LIMIT 20)")
                connection.execute("UPDATE users SET settings = settings || jsonb_build_object('theme', 'light')"
                                   " WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT 15)")
                connection.execute("UPDATE sessions SET expires_at = now() + interval '1 day',"
                                   " data = jsonb_build_object('seen', now()::text)"
                                   " WHERE sid IN (SELECT sid FROM sessions ORDER BY random() LIMIT 15)")
                connection.execute("INSERT INTO audit_log (user_id, action, details) SELECT (random() * 399)::int + 1,"
                                   " 'view', jsonb_build_object('ip', '10.0.1.' || g) FROM generate_series(1, 28) g")
            with connection.transaction():  # logins and links
                connection.execute("INSERT INTO sessions (sid, user_id, data, expires_at) SELECT md5(random()::text),"
                                   " (random() * 399)::int + 1, '{}', now() + interval '1 day' FROM generate_series(1, 5)")
                connection.execute("INSERT INTO share_links (token, file_id) SELECT md5(random()::text), id"
                                   " FROM files WHERE id = ANY(%s) LIMIT 3", (new_files,))
            with connection.transaction():  # pg-boss: jobs for the uploads, and the previous batch done
                connection.execute("UPDATE pgboss.job SET state = 'completed' WHERE id IN"
                                   " (SELECT id FROM pgboss.job WHERE state <> 'completed' ORDER BY created_on LIMIT 20)")
                connection.execute("INSERT INTO pgboss.job (name, data) SELECT 'thumbnail', jsonb_build_object('n', g)"
                                   " FROM generate_series(1, 30) g")
        return {"uploads_bytes_written": added_bytes, "uploads_bytes_removed": removed_bytes}

    def drop(self) -> None:
        with connect() as admin:
            found = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                                  (DATABASE,)).fetchone()
            if found is not None and found[0] == MARKER:
                tma_cloud.drop_database(admin, DATABASE)
