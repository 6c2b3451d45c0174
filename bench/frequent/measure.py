"""Measuring a command: its wall time, its CPU and its tools' (os.wait4), and the CPU of the PostgreSQL
backends that serve it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent.parent
HOST, PORT, USER = os.environ.get("DB_HOST", "127.0.0.1"), os.environ.get("DB_PORT", "5432"), os.environ.get("DB_USER", "postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")

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


def measured(argv: list[str], env: dict[str, str], cwd: Path, postmaster: int | None, database: str) -> Ran:
    """Run `argv`; wall time, and the CPU of the process and all its descendants (os.wait4's rusage:
    every descendant its parent waited for, i.e. every tool the CLI ran)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            BackendSampler(postmaster, database) as sampler:
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

