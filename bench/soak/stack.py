"""The soak's stack (bench/soak/__main__.py): real services on this machine, private to one soak, that its faults
can kill, stop and fill.

- PostgreSQL 15, Redis and SeaweedFS (`weed mini`) as the test suite starts them (`tests/services.py`,
  `tests/s3_server.py`): a throw-away cluster, a Redis without persistence, an S3 server whose data
  survives its restarts. Each can be restarted on the same port and folder.
- Two tma-backup workers on two hosts (`soak-a`, `soak-b`: each its own BACKUP_DIR, a small tmpfs that a
  fault can fill to the last byte) sharing TMA Cloud's UPLOAD_DIR and the repository, and one beat. They
  run a snapshot of the code under test (`--code`), so edits in the working tree cannot reach a worker
  that a fault restarts half-way through a soak.
- Every process is killed with its whole tree (its tools run in sessions of their own): a container's
  death, not a polite shutdown.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.proc import tree
from bench.workers import clean_environment
from tests import s3_server, services, tma_cloud

DATABASE = "tma_cloud_storage"
ROLE = "tma_soak"
HOSTS = ("soak-a", "soak-b")
FILE_KEY = "soak-file-encryption-key-0123456789abcdef"


def signal_tree(root: int, number: signal.Signals) -> list[int]:
    """Send `number` to `root` and every descendant; returns the pids signalled. SIGSTOP goes to the
    children first, so none of them notices its parent stop; the others parent first, so no parent
    restarts a child it sees die."""
    pids = tree(root)
    for pid in (reversed(pids) if number == signal.SIGSTOP else pids):
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass
    return pids


@dataclass
class Proc:
    """A Celery process (worker or beat) the soak starts, kills, stops and starts again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_offset: int = 0
    stopped: bool = False  # SIGSTOPped by a fault

    def start(self) -> None:
        self.started_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== soak: starting {self.name} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.stopped = False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, since_start: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                if since_start:
                    handle.seek(self.started_offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(since_start=True):
                return True
            if not self.alive():
                return False
            time.sleep(0.2)
        return False

    def kill(self) -> None:
        """SIGKILL the process and everything it started, at once."""
        if self.process is None:
            return
        if self.process.poll() is None:
            signal_tree(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.stopped = False

    def pause(self) -> None:
        if self.alive():
            assert self.process is not None
            signal_tree(self.process.pid, signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            signal_tree(self.process.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, grace: float = 20) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.resume()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Host:
    """One worker host: its worker process, BACKUP_DIR (a tmpfs) and folder."""

    name: str
    folder: Path
    worker: Proc | None = None

    @property
    def backup_dir(self) -> Path:
        return self.folder / "backups"


@dataclass
class Stack:
    root: Path
    code: Path | None  # the snapshot of worker/, tasks/ and beat_schedule.py put first on PYTHONPATH
    settings: dict[str, str]  # product settings for every process (schedules, timeouts), the soak's choice
    tmpfs_size: str = "256m"
    pg: services.PostgresServer | None = None
    redis: services.RedisServer | None = None
    s3: s3_server.S3Server | None = None
    hosts: list[Host] = field(default_factory=list)
    beat: Proc | None = None
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    repository_password: str = field(default_factory=lambda: secrets.token_hex(16))
    bucket: str = "tma-soak"
    mounts: list[Path] = field(default_factory=list)

    # ── the services ─────────────────────────────────────────────────────────────────────────────────
    @property
    def upload_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def env_file(self) -> Path:
        return self.root / "tma-cloud.env"

    @property
    def repository(self) -> str:
        assert self.s3 is not None
        return self.s3.url(self.bucket, "sets")

    def start_services(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg = services.start_postgres()
        with self.pg.connect(autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{self.password}'")
        self.redis = services.start_redis()
        self.s3 = s3_server.start_s3(self.root / "s3")
        self.upload_dir.mkdir(mode=0o755, exist_ok=True)
        self.env_file.write_text("# TMA Cloud's .env (the parts tma-backup reads)\nSTORAGE_DRIVER=local\n"
                                 f"UPLOAD_DIR={self.upload_dir}\nFILE_ENCRYPTION_KEY={FILE_KEY}\nNODE_ENV=production\n")
        self.env_file.chmod(0o600)

    def create_database(self, users: int, files: int) -> None:
        """TMA Cloud's database with `files` uploads, as TMA writes them (tests/tma_cloud.py)."""
        assert self.pg is not None
        tma_cloud.create_populated(self.pg, DATABASE)
        with self.pg.connect(DATABASE, autocommit=True) as connection:
            if users > 50:
                connection.execute(
                    "INSERT INTO users (email, name, settings) SELECT 'user' || g || '@example.com', 'User number ' || g,"
                    " jsonb_build_object('theme', 'light', 'quota', g * 1024) FROM generate_series(51, %s) g", (users,))
            tma_cloud.make_uploads(connection, self.upload_dir, files, sizes=(512, 48 * 1024), trashed=5, seed=1)

    def connect(self, dbname: str = DATABASE, **options: Any) -> psycopg.Connection[Any]:
        assert self.pg is not None
        return self.pg.connect(dbname, **options)

    # ── tma-backup's settings and processes ──────────────────────────────────────────────────────────
    def env(self, host: str = HOSTS[0], broker: bool = True) -> dict[str, str]:
        """What every tma-backup process of `host` is given (the CLI too)."""
        assert self.pg is not None and self.redis is not None and self.s3 is not None
        folder = self.root / "hosts" / host
        values = {
            "DB_HOST": self.pg.host, "DB_PORT": str(self.pg.port), "DB_USER": ROLE, "DB_PASSWORD": self.password,
            "DB_NAME": DATABASE, "DB_MODE": "host",
            "BACKUP_DIR": str(folder / "backups"), "WORKER_HOST": host, "HOME": str(folder / "home"),
            "TMA_ENV_FILE": str(self.env_file),
            "BACKUP_REPOSITORY": self.repository, "BACKUP_REPOSITORY_PASSWORD": self.repository_password,
            **self.s3.env(),
            **self.settings,
        }
        if broker:
            values["CELERY_BROKER_URL"] = self.redis.url
        if self.code is not None:
            values["PYTHONPATH"] = f"{self.code}{os.pathsep}{services.REPO}"
        return clean_environment(values)

    def restic_env(self) -> dict[str, str]:
        """The plain restic CLI's environment for the repository (the soak's own checks)."""
        assert self.s3 is not None
        cache = self.root / "restic-cache"
        cache.mkdir(exist_ok=True)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cache), "RESTIC_CACHE_DIR": str(cache),
                "RESTIC_REPOSITORY": self.repository, "RESTIC_PASSWORD": self.repository_password,
                **self.s3.aws_env()}

    def mount_backup_dirs(self) -> None:
        for host in HOSTS:
            folder = self.root / "hosts" / host
            (folder / "home").mkdir(parents=True, exist_ok=True)
            backups = folder / "backups"
            backups.mkdir(parents=True, exist_ok=True)
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size},mode=0700", "tmpfs",
                                      str(backups)], capture_output=True, text=True)
            if mounted.returncode != 0:
                raise services.ServiceUnavailable(f"cannot mount a tmpfs for BACKUP_DIR (needs root): "
                                                  f"{mounted.stderr.strip()}")
            self.mounts.append(backups)
            self.hosts.append(Host(host, folder))

    def start_workers(self) -> None:
        for host in self.hosts:
            argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-E", "--loglevel=INFO",
                    "-n", f"w@{host.name}", "-c", "2", "--without-mingle", "--without-gossip"]
            host.worker = Proc(f"worker {host.name}", argv, self.env(host.name), host.folder,
                               host.folder / "worker.log")
            host.worker.start()
        for host in self.hosts:
            assert host.worker is not None
            if not host.worker.wait_for("ready.", 90):
                raise RuntimeError(f"worker {host.name} did not start: {host.worker.log()[-3000:]}")

    def start_beat(self) -> None:
        folder = self.root / "beat"
        folder.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel=INFO",
                "-s", str(folder / "schedule")]
        self.beat = Proc("beat", argv, self.env(HOSTS[0]), folder, folder / "beat.log")
        self.beat.start()
        if not self.beat.wait_for("beat: Starting", 60):
            raise RuntimeError(f"beat did not start: {self.beat.log()[-3000:]}")

    def cli(self, *args: str, host: str = HOSTS[0], broker: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`tma-backup ARGS` as an operator runs it (through the broker unless `broker` is False)."""
        try:
            return subprocess.run([services.TMA_BACKUP, *args], env=self.env(host, broker), cwd=self.root,
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
            return subprocess.CompletedProcess(expired.cmd, -999, out, err + f"\n[soak] timed out after {timeout:.0f} s")

    # ── the end ──────────────────────────────────────────────────────────────────────────────────────
    def processes(self) -> list[Proc]:
        return [proc for proc in [*(host.worker for host in self.hosts), self.beat] if proc is not None]

    def stop(self) -> None:
        """Everything the soak started goes, whatever state the faults left it in."""
        for proc in self.processes():
            try:
                proc.resume()
                proc.kill()
            except Exception as error:  # noqa: BLE001 (stop the rest regardless)
                print(f"[WARN] stopping {proc.name}: {error}", file=sys.stderr)
        if self.s3 is not None:
            self.s3._signal(signal.SIGCONT)
            self.s3.kill()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop("immediate")
            shutil.rmtree(self.pg.data_dir.parent, ignore_errors=True)
        for mount in self.mounts:
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], check=False)
        self.mounts.clear()
