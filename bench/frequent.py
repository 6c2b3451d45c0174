"""Issue 24's figures: what a whole set every 15 minutes costs, with the real tools. Runs on its own
(it shares nothing with bench.run):

    .venv/bin/python -m bench.frequent [--runs 3] [--uploads-mb 60] [--work-dir DIR] [--out DIR] [--keep]

A small TMA Cloud (tests/tma_cloud.py's schema: ~4,000 rows, 300 uploads of ~60 MB in an UPLOAD_DIR,
its `.env` as TMA_ENV_FILE) is backed up by the CLI in-process (no broker) into a local restic
repository, with BACKUP_SCHEDULE="*/15 * * * *", against the machine's PostgreSQL. After one first
whole set (recorded, not in the medians), each round measures `tma-backup backup --if-changed` as a
subprocess: wall seconds, CPU seconds of the CLI and every tool it runs (`os.wait4`), the CPU of the
PostgreSQL backends that serve it (sampled from /proc every 20 ms: a lower bound), and the bytes the
repository folder grew by, in these cases:

a. **unchanged**: nothing a user did since the last set. TMA Cloud idle is not silent: before the run
   pg-boss's maintenance touches its job table (IDLE below), which BACKUP_UNCHANGED_IGNORE leaves out.
   Checked: exit 0, the CLI's "Unchanged" line, no new snapshot (`restic snapshots --json` before and
   after), no new dump in BACKUP_DIR, and the check recorded (`checked_at` of BACKUP_DIR/.last-set-*.json).
b. **changed**: after "a typical 15 minutes of activity" on TMA Cloud (ACTIVITY below). Checked: a new
   set of two parts (database, uploads) and a new record.
c. **bare**: the same job done by the bare tools in the same round, on the same state: `pg_dump -Fc
   --compress=6` of the database, then `restic backup` of the dump and `restic backup` of UPLOAD_DIR
   (restic finds its parent: unchanged files are not read) into a bare repository of its own that had
   the same first set. Measured after a (what a cron job of bare tools would pay every 15 minutes) and
   after b. `pg_dump` alone is also reported.

For context, also: the CLI's start-up alone (`tma-backup --help`: what every in-process run pays before
it does anything; a worker pays it once), and one restic command (`restic snapshots --json` of the
repository, the bench's own counts: every restic command opens the repository and derives its key).

A typical 15 minutes of activity (ACTIVITY), in a few transactions as TMA Cloud would write them:
- 10 uploads of 150-250 KB (random bytes standing for AES-GCM blobs, 32 bytes over the plain size),
  each with its `files` row, and 2 uploads deleted as TMA Cloud's purge does (blob, then row);
- 50 rows updated: 20 `files` renamed (`metadata`), 15 `users` settings, 15 `sessions` touched
  (`expires_at`, `data`);
- rows inserted: 40 `audit_log`, 5 `sessions` (logins), 3 `share_links`;
- pg-boss: 30 `pgboss.job` rows inserted, 20 completed (`state`).

The rounds interleave (a, bare, activity, b, bare; the bare side goes first in every other round), so
load from elsewhere falls on both. Nothing here asserts a timing; the figures are reported beside
issue 24's goal (a 15-minute cadence costs at most 2 % of one core). A failed check is reported and
makes the exit code 1. Results: `frequent.json` and `frequent.md` in --out (default bench/results).
The database (`tma_bench_frequent`) is dropped at the end and the work folder removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests import tma_cloud

ROOT = Path(__file__).resolve().parent.parent
TMA_BACKUP = str(ROOT / ".venv" / "bin" / "tma-backup")
HOST, PORT, USER = os.environ.get("DB_HOST", "127.0.0.1"), os.environ.get("DB_PORT", "5432"), os.environ.get("DB_USER", "postgres")
DATABASE = "tma_bench_frequent"
MARKER = "made by bench.frequent"  # COMMENT ON DATABASE: a database without it is never dropped
WORK_MARKER = ".bench-frequent"  # a work folder without it is never removed
SCHEDULE = "*/15 * * * *"
GOAL_SHARE = 0.02  # issue 24: a 15-minute cadence costs at most 2 % of one core
UPLOADS = 300  # files in UPLOAD_DIR; --uploads-mb sets their total
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Settings the CLI must never inherit from the shell that started the benchmark.
_INHERITED = ("DB_", "BACKUP_", "CELERY_", "RESTORE_", "REPOSITORY_", "PG", "WORKER_", "UPLOAD", "TMA_", "STORAGE_",
              "FILE_ENCRYPTION", "RESTIC_", "AWS_", "R2_", "RUSTFS_", "MAX_RPO", "NOTIFY_", "HEALTHCHECK_", "VAULT_")

IDLE = {"pgboss.job updated": 3, "pgboss.job inserted": 1}
ACTIVITY = {
    "uploads added (files rows + blobs)": 10, "upload size (plain bytes)": "150-250 KB",
    "uploads deleted (blob + row, TMA's purge)": 2,
    "rows updated": {"files (rename: metadata)": 20, "users (settings)": 15, "sessions (touched)": 15},
    "rows inserted": {"audit_log": 40, "sessions (logins)": 5, "share_links": 3},
    "pg-boss": {"pgboss.job inserted": 30, "pgboss.job completed": 20},
}


def say(message: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", flush=True)


def loadavg() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def connect(database: str = "postgres") -> psycopg.Connection[Any]:
    return psycopg.connect(host=HOST, port=PORT, user=USER, dbname=database, autocommit=True)


def folder_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (what `du -sb` counts for files)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


# ── measuring a command: its CPU, and the CPU of the PostgreSQL backends serving it ────────────────


class BackendSampler:
    """CPU seconds of the PostgreSQL backends of `database` (children of the postmaster whose title names
    USER and the database), read from /proc every 20 ms while a command runs. A lower bound: the last
    tick before a backend exits is lost, and a backend younger than a tick may be missed entirely."""

    def __init__(self, postmaster: int | None, database: str):
        self.postmaster, self.needle = postmaster, f" {USER} {database} "
        self.seen: dict[int, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> BackendSampler:
        if self.postmaster is not None:
            self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.postmaster is not None:
            self.stopping.set()
            self.thread.join()
            self._tick()

    def _loop(self) -> None:
        while not self.stopping.wait(0.02):
            self._tick()

    def _tick(self) -> None:
        try:
            with open(f"/proc/{self.postmaster}/task/{self.postmaster}/children") as handle:
                pids = [int(pid) for pid in handle.read().split()]
        except OSError:
            return
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    title = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
                if self.needle not in title:
                    continue
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self.seen[pid] = max(self.seen.get(pid, 0), int(fields[11]) + int(fields[12]))  # utime + stime

    @property
    def seconds(self) -> float | None:
        return None if self.postmaster is None else sum(self.seen.values()) / CLK_TCK


def postmaster_pid() -> int | None:
    """The server's postmaster, when it runs on this machine (the parent of our own backend)."""
    try:
        with connect() as connection:
            backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        with open(f"/proc/{backend}/stat") as handle:
            parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{parent}/task/{parent}/children"):
            return parent
    except (OSError, ValueError, psycopg.Error):
        return None


@dataclass
class Ran:
    argv: list[str]
    code: int
    wall: float
    user: float
    system: float
    server: float | None
    stdout: str
    stderr: str = ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def cpu(self) -> float:
        return self.user + self.system


def measured(argv: list[str], env: dict[str, str], cwd: Path, postmaster: int | None) -> Ran:
    """Run `argv`; wall time, and the CPU of the process and all its descendants (os.wait4's rusage:
    every descendant its parent waited for, i.e. every tool the CLI ran)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            BackendSampler(postmaster, DATABASE) as sampler:
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = (handle.read().decode("utf-8", "replace") for handle in (out, err))
    return Ran(argv, process.returncode, wall, usage.ru_utime, usage.ru_stime, sampler.seconds, stdout, stderr)


def checked(ran: Ran, what: str) -> Ran:
    if ran.code != 0:
        raise SystemExit(f"[ERROR] {what} exited {ran.code}: {ran.output.strip()[-1500:]}")
    return ran


# ── TMA Cloud: its database, its uploads, and what it does in 15 minutes ──────────────────────────────


class Site:
    def __init__(self, work: Path, uploads_mb: int):
        self.work, self.uploads_mb = work, uploads_mb
        self.upload_dir = work / "uploads"
        self.rng = random.Random(2424)  # not make_uploads' seed: its names would come again

    def create(self) -> dict[str, Any]:
        with connect() as admin:
            found = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                                  (DATABASE,)).fetchone()
            if found is not None and found[0] != MARKER:
                raise SystemExit(f"[ERROR] database {DATABASE} exists and bench.frequent did not make it: refusing to drop it")
            tma_cloud.drop_database(admin, DATABASE)
            tma_cloud.create_database(admin, DATABASE)
            admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(DATABASE), sql.Literal(MARKER)))
        average = self.uploads_mb * 1024 * 1024 // UPLOADS
        with connect(DATABASE) as connection:
            tma_cloud.create_schema(connection)
            tma_cloud.populate(connection, users=400, files_per_user=1)
            made = tma_cloud.make_uploads(connection, self.upload_dir, UPLOADS, sizes=(average // 5, average * 9 // 5),
                                          trashed=3, seed=24)
            rows = sum(connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*name.split("."))))
                       .fetchone()[0] for name in tma_cloud.TABLES)
        files, size = self.uploads()
        return {"rows": rows, "uploads": files, "uploads_bytes": size, "referenced": len(made.sizes)}

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


# ── the bench ────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    measurements: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restic_floor: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) of `restic snapshots`

    def __post_init__(self) -> None:
        self.site = Site(self.work, self.args.uploads_mb)
        self.repository = self.work / "repository"
        self.bare_repository = self.work / "bare-repository"
        self.backup_dir = self.work / "backups"
        self.bare_dir = self.work / "bare"
        self.home = self.work / "home"
        self.env_file = self.work / "tma-cloud.env"
        self.postmaster = postmaster_pid()

    # environments
    def restic_env(self, repository: Path) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                "XDG_CACHE_HOME": str(self.home / "cache"), "RESTIC_REPOSITORY": str(repository),
                "RESTIC_PASSWORD": self.password}

    def cli_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED)}
        env.update({"DB_MODE": "host", "DB_HOST": HOST, "DB_PORT": PORT, "DB_USER": USER, "DB_NAME": DATABASE,
                    "BACKUP_DIR": str(self.backup_dir), "BACKUP_REPOSITORY": str(self.repository),
                    "BACKUP_REPOSITORY_PASSWORD": self.password, "BACKUP_SCHEDULE": SCHEDULE,
                    "TMA_ENV_FILE": str(self.env_file), "HOME": str(self.home),
                    "XDG_CACHE_HOME": str(self.home / "cache")})
        return env

    def cli(self, *args: str) -> Ran:
        return measured([TMA_BACKUP, *args], self.cli_env(), self.work, self.postmaster)

    def restic(self, repository: Path, *args: str) -> Ran:
        return checked(measured(["restic", *args], self.restic_env(repository), self.work, None), f"restic {args[0]}")

    def snapshots(self, repository: Path) -> list[dict[str, Any]]:
        listed = self.restic(repository, "snapshots", "--json")
        if repository == self.repository:  # context: what any one restic command costs here
            self.restic_floor.append((listed.wall, listed.cpu))
        return json.loads(listed.stdout or "[]")

    # state the checks read
    def record(self) -> dict[str, Any] | None:
        found = sorted(self.backup_dir.glob(".last-set-*.json"))
        if len(found) != 1:
            return None
        return json.loads(found[0].read_text())

    def dumps(self) -> list[str]:
        return sorted(path.name for path in self.backup_dir.glob(f"{DATABASE}_*") if path.name.endswith((".dump", ".dump.zst")))

    def state(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots(self.repository), "dumps": self.dumps(), "record": self.record(),
                "repository_bytes": folder_bytes(self.repository)}

    # set-up
    def prepare(self) -> dict[str, Any]:
        if self.work.exists():
            if not (self.work / WORK_MARKER).exists() and any(self.work.iterdir()):
                raise SystemExit(f"[ERROR] {self.work} exists and bench.frequent did not make it: refusing to use it")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        (self.work / WORK_MARKER).write_text("bench.frequent's work folder: removed at the end unless --keep\n")
        self.backup_dir.mkdir(mode=0o700)
        self.bare_dir.mkdir()
        (self.home / "cache").mkdir(parents=True)
        say(f"TMA Cloud: database {DATABASE}, {UPLOADS} uploads of {self.args.uploads_mb} MiB in {self.site.upload_dir}")
        data = self.site.create()
        say(f"  {data['rows']} rows, {data['uploads']} uploads, {data['uploads_bytes'] / 1e6:.1f} MB")
        self.env_file.write_text("# TMA Cloud's .env (the parts tma-backup reads)\nSTORAGE_DRIVER=local\n"
                                 f"UPLOAD_DIR={self.site.upload_dir}\nFILE_ENCRYPTION_KEY={secrets.token_hex(16)}\n"
                                 "NODE_ENV=production\n")
        self.env_file.chmod(0o600)
        checked(self.cli("repository", "init"), "tma-backup repository init")
        self.restic(self.bare_repository, "init")
        return data

    def first_sets(self) -> None:
        """The first whole set (recorded, not in the medians), and the bare repository's first set."""
        before = folder_bytes(self.repository)
        ran = checked(self.cli("backup"), "the first whole set (tma-backup backup)")
        after = self.state()
        if len(after["snapshots"]) != 2 or after["record"] is None:
            self.problems.append(f"the first set made {len(after['snapshots'])} snapshot(s) (expected 2: database,"
                                 f" uploads), record {after['record']}")
        self.add("first whole set", 0, ran, after["repository_bytes"] - before, sets=len(after["snapshots"]))
        self.bare_set("bare set, first", 0)

    # the measurements
    def add(self, step: str, round_: int, ran: Ran, sent: int | None, **extra: Any) -> dict[str, Any]:
        load = loadavg()
        item = {"step": step, "round": round_, "wall_seconds": round(ran.wall, 3), "cpu_seconds": round(ran.cpu, 3),
                "user_seconds": round(ran.user, 3), "system_seconds": round(ran.system, 3),
                "server_cpu_seconds": None if ran.server is None else round(ran.server, 3),
                "repository_bytes_added": sent, "load": load, **extra}
        self.measurements.append(item)
        server = "n/a" if ran.server is None else f"{ran.server:.2f}"
        say(f"  {step}: {ran.wall:.2f} s wall, {ran.cpu:.2f} s CPU (+ PostgreSQL {server} s),"
            f" {'n/a' if sent is None else f'{sent / 1e3:.0f} kB'} added (load {load[0]})")
        return item

    def if_changed(self, step: str, round_: int, expect_unchanged: bool) -> None:
        before = self.state()
        time.sleep(1.1)  # one set a second: two runs never share a timestamp
        ran = self.cli("backup", "--if-changed")
        after = self.state()
        new_sets = [item for item in after["snapshots"] if item["id"] not in {old["id"] for old in before["snapshots"]}]
        said_unchanged = "Unchanged  :" in ran.output
        record = after["record"] or {}
        check = {"exit": ran.code, "said_unchanged": said_unchanged, "new_snapshots": len(new_sets),
                 "new_dumps": len(after["dumps"]) - len(before["dumps"]),
                 "record_timestamp": record.get("timestamp"), "record_checked_at": record.get("checked_at")}
        restic_added = {}
        for item in new_sets:
            tags = item.get("tags") or []
            part = next((tag[5:] for tag in tags if tag.startswith("part:")), "?")
            added = next((tag[6:] for tag in tags if tag.startswith("added:")), None)
            restic_added[part] = int(added) if added and added.isdigit() else None
        if new_sets and after["dumps"]:  # the uploads part's data_added is in the .meta, not in a tag
            from worker.archive import catalogue
            from worker.archive.meta import read_meta

            extra = read_meta(catalogue.meta_path(self.backup_dir / after["dumps"][-1])).extra
            if extra.get("uploads_bytes_added") is not None:
                restic_added["uploads"] = int(extra["uploads_bytes_added"])
        if ran.code != 0:
            self.problems.append(f"round {round_}, {step}: exit {ran.code}: {ran.output.strip()[-600:]}")
        elif expect_unchanged:
            old_check = (before["record"] or {}).get("checked_at")
            if not said_unchanged or new_sets or check["new_dumps"] or not record.get("checked_at") \
                    or record.get("checked_at") == old_check:
                self.problems.append(f"round {round_}, {step}: not taken as unchanged: {check}")
        elif said_unchanged or len(new_sets) != 2 or check["new_dumps"] != 1 \
                or record.get("timestamp") == (before["record"] or {}).get("timestamp"):
            self.problems.append(f"round {round_}, {step}: no new set of two parts after the activity: {check}")
        self.add(step, round_, ran, after["repository_bytes"] - before["repository_bytes"], check=check,
                 restic_data_added=restic_added or None)

    def bare_set(self, step: str, round_: int) -> None:
        """The bare tools: pg_dump -Fc, then restic backup of the dump and of UPLOAD_DIR (two snapshots,
        as the product's two parts), into the bare repository."""
        dump = self.bare_dir / f"{DATABASE}.dump"
        before = folder_bytes(self.bare_repository)
        pg_dump = checked(measured(["pg_dump", "-h", HOST, "-p", PORT, "-U", USER, "-Fc", "--compress=6", "-f", str(dump),
                                    DATABASE], {**os.environ, "PGCONNECT_TIMEOUT": "10"}, self.work, self.postmaster),
                          "pg_dump")
        database_part = self.restic(self.bare_repository, "backup", "--json", "--tag", "part:database", str(dump))
        uploads_part = self.restic(self.bare_repository, "backup", "--json", "--tag", "part:uploads",
                                   str(self.site.upload_dir))
        sent = folder_bytes(self.bare_repository) - before
        total = Ran(["bare set"], 0, pg_dump.wall + database_part.wall + uploads_part.wall,
                    pg_dump.user + database_part.user + uploads_part.user,
                    pg_dump.system + database_part.system + uploads_part.system, pg_dump.server, "")
        self.add(step, round_, total, sent, pg_dump={"wall_seconds": round(pg_dump.wall, 3),
                                                      "cpu_seconds": round(pg_dump.cpu, 3),
                                                      "server_cpu_seconds": None if pg_dump.server is None
                                                      else round(pg_dump.server, 3),
                                                      "dump_bytes": dump.stat().st_size},
                 restic_seconds={"database": round(database_part.wall, 3), "uploads": round(uploads_part.wall, 3)})
        dump.unlink()

    def status(self) -> dict[str, Any] | None:
        """The product's own view (`tma-backup status --json`, untimed): MAX_RPO and the recovery point."""
        ran = self.cli("status", "--json")
        try:
            facts = json.loads(ran.stdout)
        except ValueError:
            self.notes.append(f"status --json gave no JSON (exit {ran.code}): {ran.output.strip()[-300:]}")
            return None
        repository = facts.get("repository") or {}
        backup = facts.get("backup") or {}
        return {"exit": ran.code, "problems": facts.get("problems"),
                "max_rpo_hours": repository.get("max_rpo_hours"), "recovery_point": repository.get("recovery_point"),
                "newest_set": repository.get("timestamp"), "unchanged_checked_at": backup.get("unchanged_checked_at")}

    def main(self) -> dict[str, Any]:
        started = datetime.now(timezone.utc)
        load_start = loadavg()
        say(f"load average at the start: {load_start}")
        data = self.prepare()
        self.first_sets()
        activities, statuses = [], []
        for round_ in range(1, self.args.runs + 1):
            say(f"round {round_}")
            bare_first = round_ % 2 == 0  # the sides take turns going first
            self.site.idle()
            if bare_first:
                self.bare_set("bare set, nothing changed", round_)
            self.if_changed("unchanged run", round_, expect_unchanged=True)
            if not bare_first:
                self.bare_set("bare set, nothing changed", round_)
            if round_ == 1:
                statuses.append({"after": "the first unchanged run", **(self.status() or {})})
            activities.append(self.site.activity())
            if bare_first:
                self.bare_set("bare set, after activity", round_)
            self.if_changed("changed run", round_, expect_unchanged=False)
            if not bare_first:
                self.bare_set("bare set, after activity", round_)
        help_run = self.cli("--help")  # the CLI's start-up alone (Python, click): what every run pays first
        self.add("CLI start-up (tma-backup --help)", 0, help_run, None)
        statuses.append({"after": "the last changed run", **(self.status() or {})})
        return self.summarise(started, load_start, data, activities, statuses)

    def summarise(self, started: datetime, load_start: list[float], data: dict[str, Any],
                  activities: list[dict[str, int]], statuses: list[dict[str, Any]]) -> dict[str, Any]:
        from worker.coordination.schedule import longest_gap, max_rpo

        def median(step: str, key: str) -> float | None:
            values = [item[key] for item in self.measurements if item["step"] == step and item[key] is not None]
            return round(statistics.median(values), 3) if values else None

        steps = ["unchanged run", "changed run", "bare set, nothing changed", "bare set, after activity"]
        medians = {step: {key: median(step, key) for key in ("wall_seconds", "cpu_seconds", "server_cpu_seconds",
                                                              "repository_bytes_added")} for step in steps}
        bare_dumps = [item["pg_dump"] for item in self.measurements if item["step"].startswith("bare set, ") and item["round"]]
        medians["bare pg_dump -Fc"] = {key: round(statistics.median(item[key] for item in bare_dumps), 3)
                                       if all(item[key] is not None for item in bare_dumps) else None
                                       for key in ("wall_seconds", "cpu_seconds", "server_cpu_seconds")}
        medians["bare pg_dump -Fc"]["repository_bytes_added"] = None
        medians["restic snapshots"] = {"wall_seconds": round(statistics.median(wall for wall, _ in self.restic_floor), 3),
                                       "cpu_seconds": round(statistics.median(cpu for _, cpu in self.restic_floor), 3),
                                       "server_cpu_seconds": None, "repository_bytes_added": None}

        def ratio(step: str, bare: str, key: str) -> float | None:
            ours, theirs = medians[step][key], medians[bare][key]
            return round(ours / theirs, 3) if ours is not None and theirs else None

        ratios = {f"{step} vs {bare}": {key: ratio(step, bare, key) for key in ("wall_seconds", "cpu_seconds",
                                                                                 "repository_bytes_added")}
                  for step, bare in (("unchanged run", "bare set, nothing changed"),
                                     ("changed run", "bare set, after activity"),
                                     ("changed run", "bare pg_dump -Fc"))}
        interval = longest_gap(SCHEDULE)
        derived_max_rpo = max_rpo(SCHEDULE, "")

        def share(step: str, with_server: bool) -> float | None:
            cpu, server = medians[step]["cpu_seconds"], medians[step]["server_cpu_seconds"]
            if cpu is None or (with_server and server is None):
                return None
            return round((cpu + (server if with_server else 0.0)) / interval.total_seconds(), 5)

        changed_wall = medians["changed run"]["wall_seconds"]
        changed_written = statistics.median(item["uploads_bytes_written"] for item in activities) if activities else None
        figures = {
            "share_of_one_core_every_run_unchanged": share("unchanged run", False),
            "share_of_one_core_every_run_changed": share("changed run", False),
            "share_of_one_core_every_run_unchanged_with_postgresql": share("unchanged run", True),
            "share_of_one_core_every_run_changed_with_postgresql": share("changed run", True),
            "goal_share_of_one_core": GOAL_SHARE,
            "schedule": SCHEDULE, "interval_seconds": interval.total_seconds(),
            "recovery_point_worst_seconds": None if changed_wall is None else round(interval.total_seconds() + changed_wall, 1),
            "max_rpo_default_seconds": derived_max_rpo.total_seconds(),
            "changed_run_bytes_added_vs_uploads_written": None if not changed_written or
            medians["changed run"]["repository_bytes_added"] is None
            else round(medians["changed run"]["repository_bytes_added"] / changed_written, 3),
            "changed_run_bytes_added_vs_set": None if medians["changed run"]["repository_bytes_added"] is None
            else round(medians["changed run"]["repository_bytes_added"] / data["uploads_bytes"], 4),
        }
        restic_version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
        code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "worker/"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return {
            "figures": figures,
            "medians": medians,
            "ratios": ratios,
            "status": statuses,
            "problems": self.problems,
            "notes": self.notes,
            "activity": {"idle_before_unchanged_run": IDLE, "typical_15_minutes": ACTIVITY, "per_round": activities},
            "data": {**data, "database": DATABASE, "uploads_mb": self.args.uploads_mb},
            "measurements": self.measurements,
            "measured": {"started": started.isoformat(timespec="seconds"),
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "runs": self.args.runs, "code": code + (" (worker/ modified)" if dirty else ""),
                         "restic": restic_version, "host": platform.node(), "cpus": os.cpu_count(),
                         "postgresql_cpu_sampled": self.postmaster is not None,
                         "load_start": load_start, "load_end": loadavg()},
        }


# ── the report ───────────────────────────────────────────────────────────────────────────────────────


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def markdown(results: dict[str, Any]) -> str:
    medians, ratios, figures, measured_ = results["medians"], results["ratios"], results["figures"], results["measured"]
    bare_of = {"unchanged run": "bare set, nothing changed", "changed run": "bare set, after activity"}
    lines = [
        "# Frequent sets (issue 24): what a 15-minute cadence costs",
        "",
        f"Measured {measured_['started']} – {measured_['finished']} on {measured_['host']} ({measured_['cpus']} CPUs), "
        f"code {measured_['code']}, {measured_['restic']}; medians of {measured_['runs']} run(s). "
        f"TMA Cloud: {results['data']['rows']} rows, {results['data']['uploads']} uploads "
        f"({_bytes(results['data']['uploads_bytes'])}); `BACKUP_SCHEDULE=\"{figures['schedule']}\"`, "
        "the CLI in-process (no broker), a local restic repository.",
        "",
        "| measurement | wall s | CPU s | PostgreSQL CPU s (sampled) | bytes sent | wall vs bare | CPU vs bare |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first = next((item for item in results["measurements"] if item["step"] == "first whole set"), None)
    if first is not None:
        lines.append(f"| first whole set (once, not a median) | {_number(first['wall_seconds'])} | "
                     f"{_number(first['cpu_seconds'])} | {_number(first['server_cpu_seconds'])} | "
                     f"{_bytes(first['repository_bytes_added'])} | | |")
    for step in ("unchanged run", "changed run", "bare set, nothing changed", "bare set, after activity", "bare pg_dump -Fc"):
        row = medians[step]
        ratio = ratios.get(f"{step} vs {bare_of[step]}") if step in bare_of else None
        title = {"unchanged run": "a. `backup --if-changed`, nothing changed",
                 "changed run": "b. `backup --if-changed`, after a typical 15 minutes",
                 "bare set, nothing changed": "c. bare `pg_dump -Fc` + `restic backup` ×2, nothing changed",
                 "bare set, after activity": "c. bare `pg_dump -Fc` + `restic backup` ×2, after the activity",
                 "bare pg_dump -Fc": "c. bare `pg_dump -Fc` alone"}[step]
        lines.append(f"| {title} | {_number(row['wall_seconds'])} | {_number(row['cpu_seconds'])} | "
                     f"{_number(row['server_cpu_seconds'])} | {_bytes(row['repository_bytes_added'])} | "
                     f"{_number(ratio and ratio['wall_seconds'], 3)} | {_number(ratio and ratio['cpu_seconds'], 3)} |")
    startup = next((item for item in results["measurements"] if item["step"].startswith("CLI start-up")), None)
    if startup is not None:
        lines.append(f"| context: the CLI's start-up alone (`tma-backup --help`) | {_number(startup['wall_seconds'])} | "
                     f"{_number(startup['cpu_seconds'])} | | | | |")
    floor = medians["restic snapshots"]
    lines.append(f"| context: one restic command (`restic snapshots --json` of the repository) | "
                 f"{_number(floor['wall_seconds'])} | {_number(floor['cpu_seconds'])} | | | | |")
    goal = _percent(figures["goal_share_of_one_core"])
    lines += [
        "",
        "CPU: the CLI and every tool it ran (`os.wait4`); PostgreSQL: its backends serving the run, sampled from /proc "
        "every 20 ms (a lower bound). Bytes sent: what the repository folder grew by.",
        "",
        "| derived | value | goal |",
        "| --- | --- | --- |",
        f"| share of one core, every 15-minute run unchanged | {_percent(figures['share_of_one_core_every_run_unchanged'])}"
        f" (with PostgreSQL's: {_percent(figures['share_of_one_core_every_run_unchanged_with_postgresql'])}) | ≤ {goal} |",
        f"| share of one core, every run after typical activity (worst realistic case) | "
        f"{_percent(figures['share_of_one_core_every_run_changed'])} (with PostgreSQL's: "
        f"{_percent(figures['share_of_one_core_every_run_changed_with_postgresql'])}) | ≤ {goal} |",
        f"| bytes sent by a changed run / uploads written by the activity | "
        f"{_number(figures['changed_run_bytes_added_vs_uploads_written'], 3)} | of the order of the change |",
        f"| bytes sent by a changed run / the uploads' total | {_number(figures['changed_run_bytes_added_vs_set'], 4)} | ≪ 1 |",
        f"| recovery point at worst (interval + a changed run's wall) | "
        f"{_number(figures['recovery_point_worst_seconds'] and figures['recovery_point_worst_seconds'] / 60)} min | |",
        f"| the product's MAX_RPO for `{figures['schedule']}` (derived) | "
        f"{figures['max_rpo_default_seconds'] / 60:.0f} min | |",
        "",
        f"Load average (1, 5, 15 min): {measured_['load_start']} at the start, {measured_['load_end']} at the end.",
    ]
    for status in results["status"]:
        lines.append(f"`tma-backup status --json` after {status['after']}: exit {status.get('exit')}, max_rpo_hours "
                     f"{status.get('max_rpo_hours')}, recovery point {status.get('recovery_point')} "
                     f"(newest set {status.get('newest_set')}).")
    lines += ["", "A typical 15 minutes of activity: " + json.dumps(results["activity"]["typical_15_minutes"]) + "; "
              "before each unchanged run, TMA Cloud idle: " + json.dumps(results["activity"]["idle_before_unchanged_run"])
              + " (BACKUP_UNCHANGED_IGNORE)."]
    if results["problems"]:
        lines += ["", "**Problems:**", *[f"- {problem}" for problem in results["problems"]]]
    if results["notes"]:
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frequent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work" / "frequent",
                        help="the database's uploads, the backups and the repositories (default bench/work/frequent)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where frequent.{json,md} go")
    parser.add_argument("--runs", type=int, default=3, help="rounds of measurements (default 3); medians are reported")
    parser.add_argument("--uploads-mb", type=int, default=60, help=f"total size of the {UPLOADS} uploads (default 60 MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the database is dropped all the same)")
    args = parser.parse_args()
    if args.runs < 1 or args.uploads_mb < 1:
        parser.error("--runs and --uploads-mb must be at least 1")
    if shutil.which("restic") is None or shutil.which("pg_dump") is None:
        print("[ERROR] bench.frequent needs restic and pg_dump on PATH", file=sys.stderr)
        return 2
    bench = Bench(args, args.work_dir.resolve())
    try:
        results = bench.main()
    finally:
        bench.site.drop()
        if not args.keep and (bench.work / WORK_MARKER).exists():
            shutil.rmtree(bench.work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frequent.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "frequent.md").write_text(markdown(results))
    print(markdown(results))
    say(f"wrote {args.out / 'frequent.json'} and {args.out / 'frequent.md'}")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
