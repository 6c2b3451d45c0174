"""The benchmark's shared machinery: the modes it measures, its bookkeeping, its workers, the code under
test, and the backups a, b and c (see bench/README.md)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from psycopg import sql

from bench import bare
from bench.generate import MIB, Server, ensure_database
from bench.proc import RssSampler, StepFailed, export_code, run
from bench.report import Measurement
from bench.workers import ChainRun, Worker, bench_app, run_chain

BENCH = Path(__file__).resolve().parent
REDIS_MARKER = "tma_bench:owner"
RESTORE_TARGET = "tma_bench_restore"
FLEET_PREFIX = "tma_bench_fleet_"
NIGHT_TARGET = "tma_bench_night"  # g.: the copy of the reference that lives two nights
FLEET_SIZE = 8
KILLED = re.compile(r"exited -9\b|exited 137\b|killed by signal 9\b")
KILLED_RETRIES = 2


@dataclass(frozen=True)
class Mode:
    """A tma-backup setting to measure: the worker runs with `settings` in its environment. An optional
    mode the worker refuses (a setting this build does not know yet) is reported as n/a, not as a failure."""

    key: str
    title: str
    settings: dict[str, str]
    optional: bool = False

    @property
    def label(self) -> str:
        return f"{self.group}. tma-backup chain, {self.title}"

    @property
    def short(self) -> str:
        return f"{self.group}. chain, {self.key}"

    @property
    def group(self) -> str:
        return "b" if self.key == "z6" else "c"


SEED_MODE = Mode("z6", "BACKUP_COMPRESSION=6 (the seed's)", {"BACKUP_COMPRESSION": "6"})
# c. tma-backup's fast modes. A new mode is one line here.
FAST_MODES = (
    Mode("z1", "BACKUP_COMPRESSION=1", {"BACKUP_COMPRESSION": "1"}),
    Mode("z0", "BACKUP_COMPRESSION=0", {"BACKUP_COMPRESSION": "0"}),
    Mode("zstd", "BACKUP_COMPRESSION=zstd-stream (level 3, .dump.zst)", {"BACKUP_COMPRESSION": "zstd-stream"},
         optional=True),
    Mode("zstd1", "BACKUP_COMPRESSION=zstd-stream:1", {"BACKUP_COMPRESSION": "zstd-stream:1"}, optional=True),
)

def say(message: str) -> None:
    print(f"[INFO]  {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"[WARN]  {message}", file=sys.stderr, flush=True)


def _first_line(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"



@dataclass
class BenchBase:
    args: argparse.Namespace
    server: Server
    work: Path
    broker_url: str
    measurements: dict[str, Measurement] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    drop_at_end: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    redis_claimed: bool = False
    restore_cli: bool = False
    containers: list[str] = field(default_factory=list)
    code_path: Path | None = None

    def __post_init__(self) -> None:
        self.app = bench_app(self.broker_url)
        self.timeout = 180.0 if self.args.quick else max(600.0, self.args.size_mb * 1.0)

    # ── bookkeeping ──────────────────────────────────────────────────────────────────────────────────
    def register(self) -> None:
        """Every measurement, in the order of the report."""
        entries = [("bare_seed", "a. bare: pg_dump -Fc -Z6 --serializable-deferrable, list, sha256sum", "a. bare, Z6")]
        entries += [(f"chain_{mode.key}", mode.label, mode.short) for mode in (SEED_MODE, *FAST_MODES)]
        entries += [
            ("restore_seed", "d. bare: sha256sum, pg_restore --list, drop, create, pg_restore --single-transaction, ANALYZE",
             "d. bare restore"),
            ("restore_tma", "d. tma-backup restore FILE --confirm DBNAME (scratch + swap)", "d. tma-backup restore"),
            ("docker_exec", "e. bare: docker exec … pg_dump -Fc -Z6 > file", "e. docker exec, Z6"),
            ("docker_tma", "e. tma-backup chain, DB_MODE=docker, BACKUP_COMPRESSION=6", "e. chain docker, Z6"),
            ("fleet_1w", f"f. {FLEET_SIZE} databases, 1 worker process (-c 1), Z6", f"f. {FLEET_SIZE} dbs, 1 worker"),
            ("fleet_2w", f"f. {FLEET_SIZE} databases, 2 worker processes (-c 1 each), Z6", f"f. {FLEET_SIZE} dbs, 2 workers"),
            ("fleet_bare_1", f"f. bare: the {FLEET_SIZE} seed backups (a.) one after another", f"f. {FLEET_SIZE} dbs, bare, 1 stream"),
            ("fleet_bare_2", f"f. bare: the {FLEET_SIZE} seed backups (a.) in 2 parallel streams", f"f. {FLEET_SIZE} dbs, bare, 2 streams"),
        ]
        for key, label, short in entries:
            self.measurements[key] = Measurement(key, label, short)

    def attempt(self, item: Measurement, action: Any) -> Any:
        """Run one measured step; a failure is recorded (and makes the run exit 1), never raised.
        A tool killed by SIGKILL from outside (something on this machine ran `pkill -KILL pg_dump`) is
        not a measurement of tma-backup: that run is discarded, noted, and run again (at most twice)."""
        for attempt in range(1 + KILLED_RETRIES):
            try:
                return action()
            except StepFailed as error:
                message = str(error)
            except Exception as error:  # noqa: BLE001 (any error of a measured step is a failed measurement)
                message = f"{type(error).__name__}: {error}"
            if not KILLED.search(message) or attempt == KILLED_RETRIES:
                break
            warn(f"{item.label}: a tool was killed from outside ({message}); running it again")
            self.notes.append(f"{item.label}: one run discarded and repeated: a tool was killed by SIGKILL "
                              f"from outside the benchmark ({message[:120]})")
        warn(f"{item.label}: FAILED: {message}")
        item.errors.append(message[:500])
        return None

    @property
    def failures(self) -> list[str]:
        return [f"{item.label}: {error}" for item in self.measurements.values() for error in item.errors]

    def worker(self, key: str, settings: dict[str, str]) -> Worker:
        folder = self.work / key
        base = {
            "DB_HOST": self.server.host, "DB_PORT": str(self.server.port), "DB_USER": self.server.user,
            "DB_NAME": "postgres", "DB_MODE": "host", "BACKUP_DIR": str(folder / "backups"),
            "BACKUP_RETAIN_COUNT": "10", "CELERY_BROKER_URL": self.broker_url,
            "WORKER_HOST": f"tma-bench-{key}-{os.getpid()}", "FOLLOW_TIMEOUT": str(int(self.timeout)),
            **self.code_env(),
        }
        if self.server.password:
            base["DB_PASSWORD"] = self.server.password
        worker = Worker(key, {**base, **settings}, folder)
        self.workers.append(worker)
        return worker

    def start_workers(self, workers: list[Worker], warm: bool = True) -> dict[str, str]:
        """Start them together; returns {key: why} for those that refused to start. `warm`: each makes
        one untimed backup first (see warm_up)."""
        for worker in workers:
            worker.start()
        refused = {}
        for worker in workers:
            try:
                worker.wait_ready(self.app, 60)
            except StepFailed as error:
                worker.stop()
                refused[worker.key] = str(error)
        for worker in workers:
            if worker.key not in refused and warm:
                self.warm_up(worker)
        return refused

    def warm_up(self, worker: Worker) -> None:
        """One untimed backup of the small `postgres` database, so that the first timed run does not pay
        for the pool process's first imports (a long-running worker has paid them long ago). A failure
        here shows again, recorded, in the first timed run."""
        try:
            run_chain(self.app, worker, "postgres", self.timeout)
        except StepFailed as error:
            warn(f"warming worker {worker.key} up: {error}")
        worker.clear_backups()

    def stop_worker(self, worker: Worker) -> None:
        worker.stop()
        if worker in self.workers:
            self.workers.remove(worker)

    def stop_workers(self, workers: list[Worker]) -> None:
        """Stop them side by side (each may take seconds to shut down warm)."""
        with ThreadPoolExecutor(max(len(workers), 1)) as pool:
            list(pool.map(self.stop_worker, workers))

    # ── the code under test ──────────────────────────────────────────────────────────────────────────
    def snapshot_code(self) -> dict[str, Any]:
        """Workers, the CLI and the probes run a snapshot of the project's code at --code (a git revision,
        default HEAD) put first on their PYTHONPATH, so that edits in progress in the working tree cannot
        change the code under test half-way through a run. `--code worktree` uses the working tree."""
        repo = BENCH.parent
        if self.args.code == "worktree":
            return {"source": "worktree", "commit": _first_line(["git", "-C", str(repo), "rev-parse", "HEAD"])}
        commit = run(["git", "-C", str(repo), "rev-parse", "--verify", f"{self.args.code}^{{commit}}"],
                     stdout=subprocess.PIPE).stdout.decode().strip()
        target = self.work / "code"
        export_code(repo, commit, target)
        self.code_path = target
        return {"source": self.args.code, "commit": commit}

    def code_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.code_path)} if self.code_path else {}

    # ── set-up ───────────────────────────────────────────────────────────────────────────────────────
    def claim_redis(self) -> None:
        client = redis.Redis.from_url(self.broker_url)
        if client.dbsize() and not client.exists(REDIS_MARKER):
            raise SystemExit(f"[ERROR] Redis {self.broker_url} is not empty and not the benchmark's: "
                             "choose another --redis-db")
        client.flushdb()  # only ever the benchmark's own database (checked above)
        client.set(REDIS_MARKER, str(os.getpid()))
        self.redis_claimed = True

    def reference(self, name: str, size_mb: int) -> tuple[str, int]:
        generated = ensure_database(self.server, name, size_mb, say)
        if generated.created and not self.args.keep_databases:
            self.drop_at_end.add(name)
        return generated.name, generated.size_bytes

    def drop_leftovers(self) -> None:
        """Databases this benchmark names for itself (restore targets, their kept copies, fleet copies)."""
        with self.server.connect(autocommit=True) as admin:
            names = [row[0] for row in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s OR datname LIKE %s OR datname LIKE %s",
                (RESTORE_TARGET.replace("_", r"\_") + "%", FLEET_PREFIX.replace("_", r"\_") + "%",
                 NIGHT_TARGET.replace("_", r"\_") + "%"))]
            for name in names:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop_kept_copies(self, target: str) -> None:
        """Untimed: the copies a restore keeps for roll-back (`<db>__pre_restore_<ts>`) and any scratch."""
        with self.server.connect(autocommit=True) as admin:
            for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                         (target.replace("_", r"\_") + r"\_\_%",)).fetchall():
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def exact_counts(self, database: str) -> dict[str, int]:
        with self.server.connect(database) as connection:
            tables = connection.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1, 2").fetchall()
            return {f"{schema}.{table}": connection.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()[0]
                for schema, table in tables}

    # ── a, b, c: backups ─────────────────────────────────────────────────────────────────────────────
    def bare_backup(self, database: str) -> None:
        item = self.measurements["bare_seed"]
        out = self.work / "bare" / f"{database}.dump"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            timed = self.attempt(item, lambda: bare.seed_backup(self.server, database, out))
        finally:
            out.unlink(missing_ok=True)
        if timed:
            item.walls.append(timed.wall)
            item.sizes.append(timed.size_bytes)
            item.steps.append(timed.steps)

    def chain_backup(self, item: Measurement, worker: Worker, database: str, keep: bool = False,
                     timed: bool = True) -> ChainRun | None:
        worker.clear_backups()
        assert worker.process is not None
        with RssSampler(worker.process.pid) as rss:
            chained = self.attempt(item, lambda: run_chain(self.app, worker, database, self.timeout))
        if chained and timed:
            item.walls.append(chained.wall)
            item.sizes.append(int(chained.summary["size_bytes"]))
            item.steps.append(chained.steps)
            item.extra.append({"worker_rss_growth_mb": round(rss.growth_mb, 1),
                               "worker_rss_peak_mb": round(rss.peak / MIB, 1)})
        if not keep:
            worker.clear_backups()
        return chained

