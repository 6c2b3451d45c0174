"""Real services for the tests, started privately so that tests can stop, restart and break them.

- PostgreSQL: a throw-away cluster (`initdb` + `postgres`, from the machine's PostgreSQL 15 packages:
  `apt-get install postgresql-15`) in a temporary folder on a free port. Host connections from
  127.0.0.1 need a password (scram-sha-256) except for the superuser `postgres`, which is trusted so
  the fixtures can set things up.
- Redis: a private `redis-server` (`apt-get install redis-server`) on a free port, nothing on disk.
- Celery workers: `celery -A worker worker -E` subprocesses with their own environment.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
# The installed entry point, the command operators run (`pip install -e .` puts it beside the interpreter).
TMA_BACKUP = str(Path(sys.executable).with_name("tma-backup"))


class ServiceUnavailable(Exception):
    """A service the tests need cannot be started here; the message says how to get it."""


class PortTaken(ServiceUnavailable):
    """The free port picked for a server was taken by someone else before the server bound it."""



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pg_bin(tool: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / tool).exists():
            return str(candidate / tool)
    found = shutil.which(tool)
    if not found:
        raise ServiceUnavailable(f"{tool} not found: install PostgreSQL 15 (apt-get install postgresql-15)")
    return found


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable("running as root needs a 'postgres' system user (apt-get install postgresql-15)") from None
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / "postgres.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def admin_kwargs(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": "postgres", "dbname": dbname}

    def connect(self, dbname: str = "postgres", **options: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.admin_kwargs(dbname), **options)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*_as_postgres_user(), _pg_bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir}",
             "-c", "fsync=off", "-c", "max_connections=200", "-c", "shared_buffers=256MB"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceUnavailable(f"postgres exited: {self.log_path.read_text()[-2000:]}")
            try:
                with self.connect(connect_timeout=1) as connection:
                    answering = connection.execute("SHOW data_directory").fetchone()
            except psycopg.OperationalError:
                time.sleep(0.1)
                continue
            if answering is None or Path(answering[0]).resolve() != self.data_dir.resolve():
                # Another test process's cluster took the port between our pick and our bind: ours is
                # exiting ("could not bind"). Never hand that cluster out as ours.
                self.stop("immediate")
                raise PortTaken(f"port {self.port} answers for another cluster ({answering})")
            return
        raise ServiceUnavailable("postgres did not accept connections within 30 s")

    def stop(self, mode: str = "fast") -> None:
        """fast: SIGINT (clean shutdown, sessions cut); immediate: SIGQUIT; kill: SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "kill": signal.SIGKILL}[mode]
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if mode == "kill":  # children survive a killed postmaster; end them too
            subprocess.run(["pkill", "-KILL", "-f", f"-D {self.data_dir}"], check=False)
            time.sleep(0.5)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)


def start_postgres() -> PostgresServer:
    root = Path(tempfile.mkdtemp(prefix="tma-test-pg-"))
    data_dir = root / "data"
    data_dir.mkdir()
    if _as_postgres_user():
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(data_dir, "postgres", "postgres")
    result = subprocess.run(
        [*_as_postgres_user(), _pg_bin("initdb"), "-D", str(data_dir), "-U", "postgres", "-E", "UTF8",
         "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise ServiceUnavailable(f"initdb failed: {result.stderr.strip()[-500:]}")
    hba = data_dir / "pg_hba.conf"
    hba.write_text(
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    for attempt in range(3):  # a port picked free may be taken before postgres binds it (parallel runs)
        server = PostgresServer(data_dir, free_port())
        try:
            server.start()
            return server
        except ServiceUnavailable as error:
            server.stop("immediate")
            bind_failed = "could not bind" in server.log_path.read_text(errors="replace")
            if attempt == 2 or not (isinstance(error, PortTaken) or bind_failed):
                raise
            (server.data_dir / "postmaster.pid").unlink(missing_ok=True)
            server.log_path.rename(server.log_path.with_suffix(f".{attempt}.log"))
    raise AssertionError("unreachable")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServiceUnavailable("redis-server not found: apt-get install redis-server")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PortTaken(f"redis-server exited with {self.process.returncode} (port {self.port} taken?)")
            try:
                answering = client.info("server").get("process_id")
            except redis.ConnectionError:
                time.sleep(0.05)
                continue
            finally:
                client.close()
            if answering != self.process.pid:  # another test process's Redis on the port we picked
                self.stop()
                raise PortTaken(f"port {self.port} answers for another redis-server (pid {answering})")
            return
        raise ServiceUnavailable("redis-server did not answer within 15 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_redis() -> RedisServer:
    for attempt in range(3):  # a port picked free may be taken before redis-server binds it (parallel runs)
        server = RedisServer(free_port())
        try:
            server.start()
            return server
        except PortTaken:
            server.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@dataclass
class WorkerProcess:
    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, extra_args: list[str] | None = None, wait: bool = True) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-E", "--loglevel=INFO",
             "-n", self.name, "-c", "2", "--without-mingle", "--without-gossip", *(extra_args or [])],
            env=self.env, cwd=self.env.get("TEST_CWD", str(REPO)), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log()[-3000:]}")
            if "ready." in self.log():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready within {timeout}s: {self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_postgres_with_ssl(cert_file: Path, key_file: Path, hba: str, **conf: str) -> PostgresServer:
    """A private cluster as `start_postgres()` makes it, restarted with TLS on: `cert_file` and `key_file`
    (PEM) copied into its data folder (the key 0600, owned by the server's user, as the server demands),
    `hba` as its pg_hba.conf and `conf` as extra postgresql.conf settings (name=value)."""
    server = start_postgres()
    owner = ("postgres", "postgres") if _as_postgres_user() else None
    for source, name, mode in ((cert_file, "server.crt", 0o644), (key_file, "server.key", 0o600)):
        target = server.data_dir / name
        shutil.copyfile(source, target)
        os.chmod(target, mode)
        if owner:
            shutil.chown(target, *owner)
    settings = {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key", **conf}
    with open(server.data_dir / "postgresql.conf", "a") as handle:
        handle.write("".join(f"\n{name} = '{value}'" for name, value in settings.items()) + "\n")
    (server.data_dir / "pg_hba.conf").write_text(hba)
    server.stop("fast")
    server.start()
    return server
