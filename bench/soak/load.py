"""TMA Cloud's steady write load for the soak (bench/soak/__main__.py), and the record that lets every set be
matched with what was live when its snapshot was taken.

One writer, one transaction a *tick*: users sign up and change their settings, sessions come and go,
audit rows are written, pg-boss jobs are queued, finished and cleaned, share links are made and
expire, and uploads are added and removed as TMA Cloud does it: the blob is written into UPLOAD_DIR
first (`[IV][data][tag]`, 32 bytes longer than `files.size`, under a new random key), then its row;
deleting is the trash (`deleted_at`), and 15 days later the purge: the blob, then the row (the soak
starts with uploads trashed about 15 days before, so that purges fall due while it runs). TMA's orphan
cleanup removes blobs no row references (never the tool's `.tma-*` entries).

Every tick also writes one audit row `soak.tick` carrying its number (never deleted), so the newest
tick a database holds names its state. After each commit the generator reads, in one REPEATABLE READ
snapshot, that newest tick and every table's digest (md5 of its rows in a fixed order): the state of
that tick. A set's database, restored, names its tick and must have exactly that tick's digests; and
the tick must have been live while the set's snapshot was taken (`Timeline`). Blobs are never
rewritten under a key, so the content of every key ever written (SHA-256) is the record for uploads.

`pause()` stops the load at a tick boundary (TMA Cloud stopped, as the restore runbook asks);
`resume()` goes on. Connection loss (PostgreSQL restarted, a restore's swap) is waited out.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests import tma_cloud

TABLES = tuple(tma_cloud.TABLES)
TICK_ACTION = "soak.tick"
ORPHAN_GRACE = 120.0  # an unreferenced blob younger than this is an upload in flight: TMA's cleanup leaves it


def digests(connection: psycopg.Connection[Any]) -> tuple[int | None, dict[str, str]]:
    """(newest tick, every TMA table's digest), in the caller's transaction."""
    row = connection.execute("SELECT max((details->>'soak_tick')::bigint) FROM audit_log WHERE action = %s",
                             (TICK_ACTION,)).fetchone()
    found: dict[str, str] = {}
    for name in TABLES:
        schema, table = name.split(".")
        query = sql.SQL("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t").format(
            sql.Identifier(schema, table))
        digest = connection.execute(query).fetchone()
        found[name] = str(digest[0]) if digest else ""
    return (int(row[0]) if row and row[0] is not None else None), found


def read_state(connection: psycopg.Connection[Any]) -> tuple[int | None, dict[str, str]]:
    """The newest tick and the digests of one consistent snapshot (`connection` in autocommit)."""
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return digests(connection)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Timeline:
    """When each tick was surely live: (time, tick) points, in order. Between two points the live tick was
    one of the two (a tick commits, a restore swaps, PostgreSQL restarts: never a third state)."""

    points: list[tuple[float, int]] = field(default_factory=list)

    def add(self, moment: float, tick: int) -> None:
        self.points.append((moment, tick))

    def live_between(self, start: float, end: float) -> set[int]:
        """Every tick that may have been live at some moment of [start, end]."""
        ordered = sorted(self.points)
        inside = [tick for moment, tick in ordered if start <= moment <= end]
        before = [tick for moment, tick in ordered if moment < start]
        after = [tick for moment, tick in ordered if moment > end]
        return set(inside + before[-1:] + after[:1])


@dataclass
class Record:
    """Everything the load wrote and saw, for the end's checks (also appended to `journal` as it happens)."""

    journal: Path
    states: dict[int, dict[str, str]] = field(default_factory=dict)  # tick → table digests
    timeline: Timeline = field(default_factory=Timeline)
    blobs: dict[str, str] = field(default_factory=dict)  # upload key → SHA-256 of the bytes written
    purged: dict[str, float] = field(default_factory=dict)  # upload key → when the purge unlinked its blob
    conflicts: list[str] = field(default_factory=list)  # a tick seen with two different states (a defect)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, event: dict[str, Any]) -> None:
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")

    def state(self, tick: int | None, found: dict[str, str], moment: float) -> None:
        if tick is None:
            return
        with self.lock:
            known = self.states.get(tick)
            if known is not None and known != found:
                changed = sorted(name for name in found if found[name] != known.get(name))
                self.conflicts.append(f"tick {tick} seen again at {moment:.1f} with other content in {changed}")
            self.states.setdefault(tick, found)
            self.timeline.add(moment, tick)
        self.write({"ev": "state", "t": round(moment, 3), "tick": tick, "digests": found})

    def blob(self, name: str, digest: str) -> None:
        with self.lock:
            self.blobs[name] = digest
        self.write({"ev": "blob", "t": round(time.time(), 3), "name": name, "sha256": digest})

    def purge(self, name: str) -> None:
        moment = time.time()
        with self.lock:
            self.purged.setdefault(name, moment)
        self.write({"ev": "purged", "t": round(moment, 3), "name": name})


class Load:
    """The writer thread. `interval`: seconds between ticks (each tick's own time included)."""

    def __init__(self, connect: Any, upload_dir: Path, record: Record, seed: int, interval: float = 1.0) -> None:
        self.connect = connect  # () → a new autocommit connection to TMA Cloud's database
        self.upload_dir = upload_dir
        self.record = record
        self.rng = random.Random(seed)
        self.interval = interval
        self.tick = 0
        self.committed = 0
        self.errors: dict[str, int] = {}
        self.pending_purge: set[str] = set()  # blobs unlinked whose row delete did not commit yet
        self._connection: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._run = threading.Event()
        self._run.set()
        self._idle = threading.Event()  # set while the writer waits outside a tick
        self._thread = threading.Thread(target=self._loop, name="soak-load", daemon=True)
        self.stats = {"uploads": 0, "trashed": 0, "purged": 0, "orphans_removed": 0, "untrashed": 0}

    # ── control ──────────────────────────────────────────────────────────────────────────────────────
    def start(self) -> None:
        for path in self.upload_dir.iterdir():  # the uploads made with the database (tests/tma_cloud.py)
            if path.is_file() and not path.name.startswith("."):
                self.record.blob(path.name, sha256_file(path))
        self._observe()
        self._thread.start()

    def pause(self, timeout: float = 120) -> bool:
        """Stop at a tick boundary (TMA Cloud stopped); True once the writer is idle."""
        self._run.clear()
        return self._idle.wait(timeout)

    def resume(self) -> None:
        self._drop_connection()  # a restore may have swapped the database under it
        self._observe()
        self._run.set()

    def stop(self) -> None:
        self._stop.set()
        self._run.set()
        self._thread.join(120)
        self._drop_connection()
        self._observe()

    # ── the writer ───────────────────────────────────────────────────────────────────────────────────
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._run.is_set():
                self._idle.set()
                self._run.wait()
                continue
            self._idle.clear()
            started = time.monotonic()
            try:
                self._one_tick()
            except (psycopg.Error, OSError) as error:
                kind = type(error).__name__
                self.errors[kind] = self.errors.get(kind, 0) + 1
                self._drop_connection()
                self._idle.set()
                self._stop.wait(0.5)
                continue
            self._idle.set()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        self._idle.set()

    def _db(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            self._connection = self.connect()
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 (a broken connection is dropped however it answers)
                pass
        self._connection = None

    def _observe(self) -> None:
        """Read the live state (newest tick and digests) and record it: a sure point of the timeline."""
        for _ in range(60):
            try:
                with self.connect() as connection:
                    tick, found = read_state(connection)
                self.record.state(tick, found, time.time())
                return
            except psycopg.Error:
                time.sleep(1)

    def _one_tick(self) -> None:
        db = self._db()
        rng = self.rng
        self.tick += 1
        number = self.tick
        written: list[str] = []
        # Uploads first, as TMA writes them: the blob, then (in the tick's transaction) its row.
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            name = tma_cloud.upload_name(rng)
            plain = rng.randint(256, 64 * 1024)
            data = tma_cloud.write_blob(self.upload_dir / name, plain)
            self.record.blob(name, hashlib.sha256(data).hexdigest())
            written.append(f"{name}:{plain}")
        # The purge: blobs of rows trashed a while ago go first, then their rows (below).
        purge = self._purge_candidates(db) if rng.random() < 0.5 else []
        for name in purge:
            try:
                (self.upload_dir / name).unlink()
            except FileNotFoundError:
                pass
            self.record.purge(name)
            self.pending_purge.add(name)
        with db.transaction():
            newest = db.execute("SELECT max((details->>'soak_tick')::bigint) FROM audit_log WHERE action = %s",
                                (TICK_ACTION,)).fetchone()
            previous = newest[0] if newest else None
            users = [row[0] for row in db.execute("SELECT id FROM users ORDER BY id").fetchall()]
            user = rng.choice(users)
            for item in written:
                name, size = item.rsplit(":", 1)
                db.execute("INSERT INTO files (owner_id, path, mime, size, metadata) VALUES (%s, %s, %s, %s, %s)",
                           (user, name, "application/octet-stream", int(size),
                            json.dumps({"name": f"upload-{number}", "tick": number})))
                db.execute("INSERT INTO audit_log (user_id, action, details) VALUES (%s, 'file.upload', %s)",
                           (user, json.dumps({"path": name})))
                db.execute("INSERT INTO pgboss.job (name, data) VALUES ('thumbnail', %s)", (json.dumps({"path": name}),))
                self.stats["uploads"] += 1
            if self.pending_purge:
                paths = sorted(self.pending_purge)
                db.execute("DELETE FROM share_links WHERE file_id IN (SELECT id FROM files WHERE path = ANY(%s))",
                           (paths,))
                db.execute("DELETE FROM files WHERE path = ANY(%s) AND deleted_at IS NOT NULL", (paths,))
            self._rows(db, rng, user, users, number)
            db.execute("INSERT INTO audit_log (user_id, action, details) VALUES (%s, %s, %s)",
                       (user, TICK_ACTION, json.dumps({"soak_tick": number, "previous": previous})))
            self.record.write({"ev": "commit", "t": round(time.time(), 3), "tick": number, "previous": previous})
        self.stats["purged"] += len(self.pending_purge)
        self.pending_purge.clear()
        self.committed += 1
        with db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            tick, found = digests(db)
        self.record.state(tick, found, time.time())
        if rng.random() < 0.02:
            self._orphan_cleanup(db)

    def _purge_candidates(self, db: psycopg.Connection[Any]) -> list[str]:
        rows = db.execute("SELECT path FROM files WHERE type = 'file' AND path IS NOT NULL AND deleted_at IS NOT NULL"
                          " AND deleted_at < now() - interval '15 days' ORDER BY deleted_at LIMIT 2").fetchall()
        return [row[0] for row in rows]

    def _rows(self, db: psycopg.Connection[Any], rng: random.Random, user: int, users: list[int], number: int) -> None:
        """What a tick of TMA Cloud does to its rows besides uploads."""
        if rng.random() < 0.03:
            db.execute("INSERT INTO users (email, name, settings) VALUES (%s, %s, %s)",
                       (f"soak{number}-{rng.getrandbits(32):08x}@example.com", f"Soak user {number}",
                        json.dumps({"theme": "dark", "quota": rng.randint(1, 100) * 1024})))
        if rng.random() < 0.15:
            db.execute("UPDATE users SET settings = settings || %s WHERE id = %s",
                       (json.dumps({"seen": number}), rng.choice(users)))
        if rng.random() < 0.6:
            db.execute("INSERT INTO sessions (sid, user_id, data, expires_at) VALUES (%s, %s, %s, now() + interval '1 hour')"
                       " ON CONFLICT (sid) DO UPDATE SET data = EXCLUDED.data",
                       (f"s{rng.getrandbits(64):016x}", rng.choice(users), json.dumps({"cart": [number]})))
        if rng.random() < 0.4:
            db.execute("DELETE FROM sessions WHERE sid IN (SELECT sid FROM sessions ORDER BY random() LIMIT 1)")
        if rng.random() < 0.3:
            db.execute("UPDATE sessions SET data = %s WHERE sid IN (SELECT sid FROM sessions ORDER BY random() LIMIT 1)",
                       (json.dumps({"cart": [number, number + 1]}),))
        for _ in range(rng.randint(1, 3)):
            db.execute("INSERT INTO audit_log (user_id, action, details) VALUES (%s, %s, %s)",
                       (rng.choice(users), rng.choice(("login", "file.view", "file.download", "share.open")),
                        json.dumps({"ip": f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}", "n": number})))
        if rng.random() < 0.2:  # renames and moves: the row changes, never its key
            db.execute("UPDATE files SET metadata = metadata || %s WHERE id IN (SELECT id FROM files WHERE type = 'file'"
                       " AND deleted_at IS NULL ORDER BY random() LIMIT 1)", (json.dumps({"name": f"renamed-{number}"}),))
        if rng.random() < 0.25:
            db.execute("UPDATE files SET deleted_at = now() WHERE id IN (SELECT id FROM files WHERE type = 'file'"
                       " AND path IS NOT NULL AND deleted_at IS NULL ORDER BY random() LIMIT 1)")
            self.stats["trashed"] += 1
        if rng.random() < 0.03:
            db.execute("UPDATE files SET deleted_at = NULL WHERE id IN (SELECT id FROM files WHERE deleted_at IS NOT NULL"
                       " AND deleted_at > now() - interval '15 seconds' ORDER BY random() LIMIT 1)")
            self.stats["untrashed"] += 1
        if rng.random() < 0.1:
            db.execute("INSERT INTO share_links (token, file_id, expires_at) SELECT %s, id, now() + interval '7 days'"
                       " FROM files WHERE type = 'file' AND deleted_at IS NULL ORDER BY random() LIMIT 1",
                       (f"t{rng.getrandbits(64):016x}",))
        if rng.random() < 0.05:
            db.execute("DELETE FROM share_links WHERE token IN (SELECT token FROM share_links ORDER BY random() LIMIT 1)")
        if rng.random() < 0.5:
            db.execute("UPDATE pgboss.job SET state = 'completed' WHERE id IN (SELECT id FROM pgboss.job"
                       " WHERE state = 'created' ORDER BY random() LIMIT 2)")
        if rng.random() < 0.2:
            db.execute("DELETE FROM pgboss.job WHERE id IN (SELECT id FROM pgboss.job WHERE state = 'completed'"
                       " ORDER BY random() LIMIT 3)")

    def _orphan_cleanup(self, db: psycopg.Connection[Any]) -> None:
        """TMA Cloud's orphan cleanup: unlink every blob no row references (an old enough one: an upload
        in flight has its blob before its row). The tool's own `.tma-*` entries are not TMA's."""
        referenced = {row[0] for row in db.execute("SELECT path FROM files WHERE path IS NOT NULL").fetchall()}
        now = time.time()
        for entry in os.scandir(self.upload_dir):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False) or entry.name in referenced:
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_GRACE:
                    os.unlink(entry.path)
                    self.stats["orphans_removed"] += 1
            except FileNotFoundError:
                pass
