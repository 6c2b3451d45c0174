"""Helpers for the fault suite: a private stack per test (its own Redis, a real worker subprocess that
can be killed), test-only pause points inside that worker, and small readers of the resulting state.

Pause points are test-only and live here, not in the product: a worker started as
`python -m tests.faults -A worker worker ...` wraps one function of `worker.backup` before Celery starts
(prefork children inherit it), so the real chain runs, against the real PostgreSQL and Redis, up to the
named point and then blocks there until the test kills the worker. `TMA_TEST_PAUSE` names the point:

- `verify`: the verify link has started and is about to run `pg_restore --list` on the `.partial`;
- `meta-written`: the `.meta` is on disk, the `.partial` not yet renamed to `.dump`;
- `published`: the `.partial` has just been renamed to `.dump` (scratch files not yet removed, prune not run);
- `slow-checksum:N`: the checksum link takes N seconds longer (a large file, without writing one).

The dump link needs no hook: `tests.helpers.table_locked` makes the real pg_dump wait on a table lock.

`BeatSlot` runs the "beats by mistake" scenario in a thread, on a PostgreSQL and a Redis of its own, so
that its wait for a minute boundary overlaps the module's other tests instead of adding to them.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests import services, tma_cloud
from tests.conftest import PASSWORD_ROLE, TEST_PASSWORD, base_env
from tests.conftest import _unavailable as unavailable
from tests.helpers import wait_for

PAUSE_ENV = "TMA_TEST_PAUSE"
SIGNAL_DIR_ENV = "TMA_TEST_SIGNAL_DIR"


# ---------------------------------------------------------------------------------------------------
# Inside the worker process


def _reached(point: str) -> None:
    """Tell the test that the pause point is reached (a file named after it), then block."""
    directory = Path(os.environ[SIGNAL_DIR_ENV])
    (directory / point).write_text(str(os.getpid()))
    time.sleep(3600)


def install_pause_point(spec: str) -> None:
    import worker.backup.steps as backup

    point, _, argument = spec.partition(":")
    if point == "verify":
        original_verify_archive = backup.verify_archive

        def verify_archive(path: Path, *args: Any, **kwargs: Any) -> int:
            _reached("verify")
            return original_verify_archive(path, *args, **kwargs)

        backup.verify_archive = verify_archive  # type: ignore[assignment]
    elif point == "meta-written":
        original_write = backup.write_atomically

        def write_atomically(path: Path, text: str, *args: Any, **kwargs: Any) -> None:
            original_write(path, text, *args, **kwargs)
            if path.name.endswith(".meta"):
                _reached("meta-written")

        backup.write_atomically = write_atomically  # type: ignore[assignment]
    elif point == "published":
        original_fsync_dir = backup.fsync_dir

        def fsync_dir(directory: Path) -> None:
            original_fsync_dir(directory)
            _reached("published")

        backup.fsync_dir = fsync_dir  # type: ignore[assignment]
    elif point == "slow-checksum":
        original_sha256_of = backup.sha256_of

        def sha256_of(path: Path, *args: Any, **kwargs: Any) -> str:
            (Path(os.environ[SIGNAL_DIR_ENV]) / "checksum").write_text(str(os.getpid()))
            time.sleep(float(argument))
            return original_sha256_of(path, *args, **kwargs)

        backup.sha256_of = sha256_of  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown {PAUSE_ENV}={spec!r}")


def main() -> None:
    """`python -m tests.faults <celery arguments>`: Celery's own entry point, after the pause point."""
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        install_pause_point(spec)
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


# ---------------------------------------------------------------------------------------------------
# In the test process


class FaultWorker(services.WorkerProcess):
    """A real `celery -A worker worker -E` process, started through `tests.faults` (pause points)."""

    def start(self, extra_args: list[str] | None = None, wait: bool = True) -> "FaultWorker":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults", "-A", "worker", "worker", "-E", "--loglevel=INFO",
             "-n", self.name, "-c", "2", "--without-mingle", "--without-gossip", *(extra_args or [])],
            env=self.env, cwd=self.env.get("TEST_CWD", str(services.REPO)), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def pids(self) -> list[int]:
        """The worker's main process and its pool children (its process group)."""
        if self.process is None:
            return []
        found = subprocess.run(["pgrep", "-g", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]


def children_named(parents: list[int], name: str) -> list[int]:
    """PIDs of processes called `name` whose parent is one of `parents`."""
    pids = []
    for parent in parents:
        found = subprocess.run(["pgrep", "-x", name, "-P", str(parent)], capture_output=True, text=True)
        pids += [int(pid) for pid in found.stdout.split()]
    return pids


@dataclass
class Stack:
    """One test's private broker and worker(s) over the session's PostgreSQL."""

    pg: services.PostgresServer
    redis_server: services.RedisServer
    root: Path
    database: str
    settings: dict[str, str] = field(default_factory=dict)
    workers: list[FaultWorker] = field(default_factory=list)

    @property
    def backups(self) -> Path:
        return Path(self.env["BACKUP_DIR"])

    @property
    def signals(self) -> Path:
        path = self.root / "signals"
        path.mkdir(exist_ok=True)
        return path

    @property
    def env(self) -> dict[str, str]:
        values = {"BACKUP_DIR": str(self.root / "backups"), **self.settings}
        return base_env(
            self.pg, Path(values.pop("BACKUP_DIR")), CELERY_BROKER_URL=self.redis_server.url,
            WORKER_HOST="host-f", DB_NAME=self.database, TEST_CWD=str(self.root),
            **{SIGNAL_DIR_ENV: str(self.signals)}, **values,
        )

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url, socket_timeout=5)

    @functools.cached_property
    def server_identity(self) -> str:
        """The server's system_identifier, read once (the tests stop the server while they watch the lock)."""
        with self.pg.connect(autocommit=True) as admin:
            return f"pg-{admin.execute('SELECT system_identifier FROM pg_control_system()').fetchone()[0]}"

    def lock_key(self, database: str | None = None) -> str:
        """The key tma-backup locks `database` under: the server's identity, not its address."""
        return f"tma_backup:lock:{self.server_identity}:{database or self.database}"

    def lock_holder(self) -> str | None:
        value = self.redis().get(self.lock_key())
        return value.decode() if value else None

    def start_worker(self, pause: str | None = None, **settings: str) -> FaultWorker:
        env = {**self.env, **settings}
        if pause:
            env[PAUSE_ENV] = pause
        index = len(self.workers)
        worker = FaultWorker(f"f{index}@host-f", env, self.root / f"worker{index}.log").start()
        self.workers.append(worker)
        return worker

    def start_backup(self, *args: str) -> "Follower":
        """`tma-backup backup` in a subprocess that follows the chain (the operator's terminal)."""
        return Follower([services.TMA_BACKUP, "backup", *args], self.env, self.root)

    def wait_for_signal(self, point: str, timeout: float = 60) -> None:
        wait_for(lambda: (self.signals / point).exists(), timeout=timeout, what=f"the worker to reach {point}")

    def stop(self) -> None:
        for worker in self.workers:  # SIGKILL: the test is over, and its Redis goes too
            kill_worker_and_tools(worker)


@contextmanager
def private_stack(pg: services.PostgresServer, database: str, root: Path, **settings: str) -> Iterator[Stack]:
    """A Redis server of its own (so it can be killed and restarted) and the workers a test starts."""
    try:
        redis_server = services.start_redis()
    except services.ServiceUnavailable as error:
        unavailable(str(error))
    stack = Stack(pg, redis_server, root, database, settings=dict(settings))
    try:
        yield stack
    finally:
        stack.stop()
        redis_server.stop()


def kill_worker_and_tools(worker: FaultWorker) -> None:
    """SIGKILL the worker, its pool children and the client tools they started, all at once, as when
    its container or its cgroup is killed. (The tools run in sessions of their own, so a signal to the
    worker's process group alone does not reach them.)"""
    pids = worker.pids()
    tools = children_named(pids, "pg_dump") + children_named(pids, "pg_restore")
    for pid in [*pids, *tools]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if worker.process is not None:
        worker.process.wait()


class Follower:
    """A CLI subprocess whose stderr is read as it comes, so a test can wait for a line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def wait_for_line(self, text: str, timeout: float = 30) -> None:
        wait_for(lambda: any(text in line for line in self.lines), timeout=timeout,
                 what=f"the CLI to print {text!r}: {self.stderr[-1500:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (mode 0700), unmounted afterwards. Needs root (CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """`ro` or `rw`: the same tmpfs, its files kept."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte with one file; returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while handle.write(b"\1" * 65536):
                pass
        except OSError:  # ENOSPC: full
            pass
    return filler


def free_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def finished_within(follower: Follower, seconds: float) -> tuple[str, str]:
    """The CLI's (stdout, stderr), asserting that it ended within `seconds`."""
    try:
        follower.process.wait(timeout=seconds)  # the CLI's stdout is a few lines: the pipe cannot fill
    except subprocess.TimeoutExpired:
        follower.kill()
        raise AssertionError(
            f"still running after {seconds:.0f}s (it must never hang): {follower.stderr[-2000:]}") from None
    follower._reader.join(timeout=5)
    assert follower.process.stdout is not None
    return follower.process.stdout.read(), follower.stderr


def timed(action: Callable[[], Any]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


class Stopped(Exception):
    """The scenario was stopped from outside (module teardown)."""


class BeatSlot:
    """Three `celery -A worker beat` processes with BACKUP_SCHEDULE='* * * * *' and one worker, for one
    minute slot. Beats `a` and `b` send their kickoffs together; beat `late` is paused (SIGSTOP) across the
    minute boundary and resumed (SIGCONT) only once the slot's backup has finished and released its lock,
    as a late or paused beat, or a busy queue, would deliver it. Run by `start()` in a thread; `result()`
    waits for it and returns what the test asserts on."""

    SENT = "Sending due task nightly-backup (tma_backup.backup)"
    BEATS = ("a", "b", "late")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.database = "tma_beats"
        self.outcome: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beat-slot", daemon=True)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._stack: Stack | None = None
        self._pg: services.PostgresServer | None = None
        self._redis: services.RedisServer | None = None

    def start(self) -> "BeatSlot":
        self._thread.start()
        return self

    def result(self, timeout: float) -> dict[str, Any]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the beat scenario did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.outcome

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)
        self._cleanup()

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self._stopping.is_set():
                raise Stopped()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        path = self.root / f"beat-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _run(self) -> None:
        try:
            self._scenario()
        except Stopped:
            pass
        except BaseException as error:  # reported by result(), in the test
            self.error = error
        finally:
            self._cleanup()

    def _scenario(self) -> None:
        self._pg = services.start_postgres()
        with self._pg.connect(autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{TEST_PASSWORD}'")
            tma_cloud.create_database(admin, self.database)
        with self._pg.connect(self.database, autocommit=True) as connection:
            tma_cloud.create_schema(connection)
            tma_cloud.populate(connection, users=5)
        self._redis = services.start_redis()
        stack = self._stack = Stack(self._pg, self._redis, self.root, self.database,
                                    settings={"BACKUP_SCHEDULE": "* * * * *"})
        worker = stack.start_worker()
        # A beat's schedule starts when its scheduler is set up: all three must be set up within one
        # minute, to share its boundary. Start them with at least half a minute to spare.
        if time.time() % 60 > 30:
            self._wait(lambda: time.time() % 60 < 30, 35, "the next minute")
        for name in self.BEATS:
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel=DEBUG",
                 "-s", str(self.root / f"beat-{name}-schedule")],
                env=stack.env, cwd=self.root, stdout=open(self.root / f"beat-{name}.log", "ab"),
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        for name in self.BEATS:  # "Waking up in …": its scheduler is set up and waits for the boundary
            self._wait(lambda name=name: "beat: Waking up" in self.log(name), 30, f"beat {name} to start")
        late = self._processes[-1]
        os.kill(late.pid, signal.SIGSTOP)

        def backed_up() -> bool:
            complete = [entry for entry in catalogue_list(stack.backups, self.database) if entry.complete]
            return bool(complete) and stack.lock_holder() is None

        self._wait(backed_up, 75, "the slot's backup to complete and release its lock")
        self.outcome["late_sent_before_resumed"] = self.log("late").count(self.SENT)
        self.outcome["skipped_before_the_late_copy"] = worker.log().count("scheduled backup skipped")
        os.kill(late.pid, signal.SIGCONT)
        self._wait(lambda: self.SENT in self.log("late"), 15, "the late beat to send its copy")
        self._wait(lambda: worker.log().count("scheduled backup skipped") >= 2, 15, "the late copy to be skipped")
        time.sleep(1)  # anything else it would have started, it has started by now
        for process in self._processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.outcome.update(
            sent_at={name: _sent_minutes(self.log(name)) for name in self.BEATS},
            complete=[entry.path.name for entry in catalogue_list(stack.backups, self.database) if entry.complete],
            leftovers=sorted(p.name for p in stack.backups.iterdir() if ".partial" in p.name or p.name.endswith(".tmp")),
            worker_log=worker.log(),
            database=self.database,
        )

    def _cleanup(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._stack is not None:
            self._stack.stop()
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop("immediate")


def _sent_minutes(log: str) -> list[str]:
    """The minutes (`YYYYmmddTHHMM`, UTC) at which a beat's log says it sent the nightly backup."""
    pattern = re.compile(r"^\[(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):[^\]]*\] Scheduler: " + re.escape(BeatSlot.SENT),
                         re.MULTILINE)
    return ["{}{}{}T{}{}".format(*match.groups()) for match in pattern.finditer(log)]


def catalogue_list(directory: Path, database: str) -> list[Any]:
    from worker.archive import catalogue

    return catalogue.list_backups(directory, database) if directory.exists() else []


if __name__ == "__main__":
    main()
