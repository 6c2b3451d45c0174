"""Small helpers shared by the tests: reading backups back, restoring them with bare tools."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests import services, tma_cloud
from worker.archive.meta import BackupMeta, read_meta
from worker.coordination.locks import DatabaseLock, database_lock
from worker.errors import LockHeld
from worker.pg.executors import choose_executor
from worker.pg.identity import server_identity
from worker.settings import Settings


def backups_in(directory: Path, database: str) -> list[Path]:
    pattern = re.compile(re.escape(database) + r"_\d{8}T\d{6}Z\.dump")
    return sorted(path for path in directory.glob("*.dump") if pattern.fullmatch(path.name) and path.is_file())


def only_backup(directory: Path, database: str) -> tuple[Path, BackupMeta]:
    found = backups_in(directory, database)
    assert len(found) == 1, f"expected one backup of {database}, found {[p.name for p in found]}"
    return found[0], read_meta(found[0].with_name(found[0].name + ".meta"))


def assert_counts_and_checksum(server: Any, backup_dir: Path, database: str) -> tuple[Path, BackupMeta]:
    """The one backup of `database` records exactly the live row counts of every TMA table, and its
    .meta's SHA-256 and size are the file's. `server` is anything with `connect(dbname)`."""
    dump, meta = only_backup(backup_dir, database)
    with server.connect(database) as connection:
        live = tma_cloud.exact_counts(connection)
    assert meta.row_counts == live
    assert set(tma_cloud.TABLES) <= set(meta.row_counts)
    assert meta.row_counts["public.files"] == 200 and meta.row_counts["pgboss.job"] == 100
    assert meta.sha256 == sha256_file(dump)
    assert meta.file_size_bytes == dump.stat().st_size
    return dump, meta


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def toc_entries(path: Path) -> int:
    listing = subprocess.run(["pg_restore", "--list", str(path)], capture_output=True, text=True, check=True)
    return sum(1 for line in listing.stdout.splitlines() if line.strip() and not line.startswith(";"))


def restore_copy(pg: services.PostgresServer, admin: psycopg.Connection[Any], dump: Path, name: str) -> None:
    """A plain pg_restore of the dump into a new database, with bare tools."""
    tma_cloud.drop_database(admin, name)
    tma_cloud.create_database(admin, name)
    subprocess.run(
        ["pg_restore", "--exit-on-error", "--no-owner", "-h", pg.host, "-p", str(pg.port), "-U", "postgres",
         "-d", name, str(dump)], check=True, capture_output=True)


def leftovers(directory: Path) -> list[str]:
    """Files that look like an unfinished run: `.partial`, counts, temporary metas."""
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[ERROR]")]


@contextmanager
def table_locked(pg: services.PostgresServer, database: str, table: str = "files") -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on a table, so a pg_dump of the database waits (is 'running')
    until the block ends. Deterministic, without needing a huge database."""
    connection = pg.connect(database)
    connection.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        try:
            connection.rollback()
            connection.close()
        except psycopg.OperationalError:
            pass  # the test stopped the server meanwhile


def wait_for(condition: Any, timeout: float = 30, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FirstSeen:
    """Polls `condition` in a background thread from now on and records when it first held (monotonic
    time): a bound measured from an event (a kill) stays the product's, not the time the test spends
    meanwhile on other work (a CLI run, a worker start), which grows under load."""

    def __init__(self, condition: Any, interval: float = 0.05) -> None:
        self.at: float | None = None
        self._condition = condition
        self._interval = interval
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._condition():
                    self.at = time.monotonic()
                    return
            except BaseException as error:  # shown by wait()
                self._error = error
                return
            self._stop.wait(self._interval)

    def wait(self, timeout: float, what: str = "condition") -> float:
        """When the condition first held; AssertionError when it has not within `timeout` from now."""
        self._thread.join(timeout)
        self._stop.set()
        if self._error is not None:
            raise self._error
        if self.at is None:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        return self.at


def dump_waiting_on_lock(admin: psycopg.Connection[Any], database: str) -> bool:
    """pg_dump (application_name tma-backup) of this database is waiting for a table lock."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'tma-backup'"
        " AND wait_event_type = 'Lock'", (database,)).fetchone()
    return bool(row and row[0])


class PsSampler:
    """Samples every process's argv (what `ps` shows) in the background."""

    def __init__(self, interval: float = 0.02) -> None:
        self.lines: set[str] = set()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as handle:
                            self.lines.add(handle.read().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        pass
            self._stop.wait(self._interval)

    def __enter__(self) -> "PsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def settings_for(env: dict[str, str]) -> Settings:
    """The settings a CLI started with `env` reads (for taking the same lock in this process)."""
    fields = {key: value for key, value in env.items() if key in Settings.model_fields}
    return Settings(_env_file=None, **{"CELERY_BROKER_URL": None, **fields})  # type: ignore[call-arg]


def lock_of(settings: Settings, database: str, owner: str) -> DatabaseLock:
    """`database`'s lock as every run names it (the server's identity), for `owner`."""
    return database_lock(settings, database, owner, server_identity(settings, choose_executor(settings), database))


def wait_until_free(settings: Settings, database: str, timeout: float = 30) -> None:
    """Until `database`'s lock can be taken (a killed run's lease has run out), then leave it free."""

    def free() -> bool:
        lock = lock_of(settings, database, f"probe-{uuid.uuid4()}")
        try:
            lock.acquire()
        except LockHeld:
            return False
        lock.release()
        return True

    wait_for(free, timeout=timeout, interval=0.25, what=f"the lock of {database} to be free")


def accepts_connections(pg: services.PostgresServer, database: str) -> bool:
    """Whether `database` lets a session in (False only for ALLOW_CONNECTIONS false, nothing else)."""
    try:
        with pg.connect(database):
            return True
    except psycopg.OperationalError as error:
        assert "not currently accepting connections" in str(error)
        return False
