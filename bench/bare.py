"""The seed's sequences with the bare PostgreSQL tools: what tma-backup is measured against."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import sql

from bench.generate import Server
from bench.proc import StepFailed, run


@dataclass
class Timed:
    wall: float
    size_bytes: int = 0
    steps: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self.last, 4)
        self.last = now

    @property
    def wall(self) -> float:
        return self.last - self.started


def seed_backup(server: Server, database: str, out: Path, compression: str = "6") -> Timed:
    """The seed's backup: `pg_dump -Fc --compress=6 --serializable-deferrable -f FILE`, then
    `pg_restore --list FILE`, then `sha256sum FILE`."""
    env = server.tool_env()
    clock = _Clock()
    run(["pg_dump", "-Fc", f"--compress={compression}", "--serializable-deferrable", "-f", str(out), database], env)
    clock.lap("pg_dump")
    listing = run(["pg_restore", "--list", str(out)], env, stdout=subprocess.PIPE).stdout
    clock.lap("pg_restore --list")
    digest = run(["sha256sum", str(out)], env, stdout=subprocess.PIPE).stdout.split()
    clock.lap("sha256sum")
    if not any(line and not line.startswith(b";") for line in listing.splitlines()) or len(digest[0]) != 64:
        raise StepFailed("bare backup: empty TOC or no checksum")
    return Timed(clock.wall, out.stat().st_size, clock.steps)


def seed_restore(server: Server, archive: Path, target: str, validate: bool = True) -> Timed:
    """The seed's restore as its documentation lists it: validate the file (SHA-256 with `sha256sum`,
    TOC with `pg_restore --list`) before touching the database, then drop (terminating sessions),
    create, `pg_restore --single-transaction`, ANALYZE."""
    clock = _Clock()
    if validate:
        env = server.tool_env()
        run(["sha256sum", str(archive)], env, stdout=subprocess.DEVNULL)
        clock.lap("validate: sha256sum")
        run(["pg_restore", "--list", str(archive)], env, stdout=subprocess.DEVNULL)
        clock.lap("validate: pg_restore --list")
    with server.connect(autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    clock.lap("drop+create")
    run(["pg_restore", "--single-transaction", "-d", target, str(archive)], server.tool_env())
    clock.lap("pg_restore --single-transaction")
    with server.connect(target, autocommit=True) as connection:
        connection.execute("ANALYZE")
    clock.lap("analyze")
    return Timed(clock.wall, archive.stat().st_size, clock.steps)


def docker_exec_dump(container: str, user: str, database: str, out: Path, env: dict[str, str],
                     compression: str = "6") -> Timed:
    """The seed's docker mode: `docker exec <container> pg_dump -Fc … > file` (stdout to the file)."""
    clock = _Clock()
    with open(out, "wb") as handle:
        run(["docker", "exec", "-e", "PGPASSWORD", container, "pg_dump", "-U", user, "-Fc",
             f"--compress={compression}", database], env, stdout=handle)
    clock.lap("docker exec pg_dump")
    return Timed(clock.wall, out.stat().st_size, clock.steps)
