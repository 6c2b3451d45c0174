"""Docker mode: the PostgreSQL client tools inside the database's container, driven through the Docker
SDK's low-level exec API (never the docker CLI). The streams themselves are in `docker_streams.py`;
which container is used, and why, is decided in `choose.py`.

- pg_dump's stdout comes back over the exec's hijacked connection as multiplexed frames; a thread writes
  the stdout frames to the output file as they arrive (1 MiB buffered writes) and keeps only the tail of
  stderr, so memory stays flat for any dump size.
- Archives go the other way: the local file is sent in 1 MiB chunks into pg_restore's stdin, then the
  write side is shut down (end of input). A parallel restore (`--jobs=N`, N > 1) needs a seekable file:
  the archive is copied into the container first (`put_archive` with a tar stream generated in chunks)
  when its file system has room; otherwise it is streamed with one job. Either way the log says which.
- Exit codes come from `exec_inspect`. The password travels only in the exec's environment.
- The tools inside the container connect over its local socket, on the container's own port (its
  `PGPORT`, else 5432): `PGHOST` from the settings names the server as seen from this worker, not from
  inside the container.
- `connect_kwargs()` (psycopg on this worker) must reach the same server as the tools, because pg_dump
  imports the snapshot our connection exports: DB_HOST:DB_PORT is used when the server behind it answers
  from one of the container's own addresses (`inet_server_addr()`, e.g. a published port); otherwise the
  container's address on each of its networks, on the container's port, is tried; neither: one error.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from worker.archive import streams
from worker.errors import BackupError, first_line
from worker.pg.environment import ssl_note, ssl_parameters
from worker.pg.executors.base import ToolResult, parse_tool_major
from worker.pg.executors.docker_streams import (
    CHUNK,
    PID_MARKER,
    STDOUT,
    DumpStream,
    ExecStream,
    StderrTail,
    tar_stream,
    text,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

# Variables that name the server as seen from this worker; inside the container the local socket is used.
# DB_SSLMODE / DB_SSLROOTCERT (PGSSLMODE, PGSSLROOTCERT) are among them on purpose: the tools inside the
# container connect over its Unix socket, where libpq ignores sslmode (TLS exists only for TCP), and the
# traffic never leaves the container; PGSSLROOTCERT names a file on this worker, not in the container.
# What crosses the network is psycopg's connection from this worker (`connect_kwargs`, `_find_route`),
# and that one honours DB_SSLMODE. (pg_dump's output comes back through the Docker engine's API, whose
# transport is the engine's business: its socket, or DOCKER_HOST with DOCKER_TLS_VERIFY.)
_OUTSIDE_ONLY = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE", "PGPASSFILE", "PGSSLMODE", "PGSSLROOTCERT")
_JOBS = re.compile(r"^(?:--jobs=|-j)(\d+)$")


def _jobs(options: list[str]) -> int:
    jobs = 1
    for index, option in enumerate(options):
        match = _JOBS.match(option)
        if match:
            jobs = int(match[1])
        elif option in ("--jobs", "-j") and index + 1 < len(options) and options[index + 1].isdigit():
            jobs = int(options[index + 1])
    return jobs


def _without_jobs(options: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for option in options:
        if skip:
            skip = False
        elif option in ("--jobs", "-j"):
            skip = True
        elif not _JOBS.match(option):
            kept.append(option)
    return kept


class DockerExecutor:
    mode = "docker"

    def __init__(self, settings: Settings, client: Any, container: Any, reason: str) -> None:
        self._settings = settings
        self._client = client
        self._api = client.api
        self._container = container
        self.name: str = container.name
        self.image: str = container.attrs.get("Config", {}).get("Image", "") or "unknown image"
        self._reason = reason
        self._majors: dict[str, int] = {}
        self._route: dict[str, Any] | None = None
        self._route_note = ""
        self._inner_port = self._container_port()

    # ----- what the pipeline asks for -----

    def describe(self) -> str:
        route = f"; psycopg via {self._route_note}" if self._route_note else ""
        return (f"docker mode: pg_dump/pg_restore inside container '{self.name}' ({self.image}), "
                f"chosen because {self._reason}{route}")

    def meta_fields(self) -> dict[str, str]:
        from worker.backup.tma_version import app_fields

        return {"container": self.name, **app_fields(self._client)}

    def tool_major(self, tool: str) -> int:
        if tool not in self._majors:
            result = self._run([tool, "--version"], {})
            if result.returncode != 0:
                raise BackupError(
                    f"{tool} does not run inside container '{self.name}': {result.last_error_line()}")
            self._majors[tool] = parse_tool_major(result.stdout, tool)
        return self._majors[tool]

    def start_dump(self, options: list[str], env: dict[str, str], output: Path,
                   zstd_level: int | None = None) -> DumpStream:
        # `sh` reports the PID (inside the container) that pg_dump then takes over by `exec`, so that
        # kill() stops exactly this pg_dump and no other one running in the container.
        argv = ["sh", "-c", f'echo "{PID_MARKER}$$" >&2; exec "$@"', "sh", "pg_dump", *options]
        try:
            handle = streams.open_output(output, zstd_level)
        except OSError as error:
            raise BackupError(f"cannot write {output}: {error.strerror}") from None
        try:
            stream = self._exec(argv, env)
        except BaseException:
            handle.close()
            raise
        return DumpStream(stream, output, handle, self.signal_process)

    def list_archive(self, archive: Path, env: dict[str, str]) -> ToolResult:
        return self._run(["pg_restore", "--list"], env, stdin=archive)

    def restore(self, options: list[str], env: dict[str, str], archive: Path) -> ToolResult:
        jobs = _jobs(options)
        if jobs > 1:
            folder = self._copy_in(archive, jobs)
            if folder is not None:
                try:
                    return self._run(["pg_restore", *options, "--", f"{folder}/{archive.name}"], env)
                finally:
                    self._remove(folder)
            options = _without_jobs(options)
        else:
            log.info("restoring %s by streaming it into pg_restore's stdin in container %s", archive.name, self.name)
        return self._run(["pg_restore", *options], env, stdin=archive)

    def connect_kwargs(self) -> dict[str, Any]:
        if self._route is None:
            self._route = self._find_route()
        return dict(self._route)

    # ----- helpers -----

    def signal_process(self, pid: int, signal: str = "TERM") -> None:
        """Send a signal to one process inside the container (the shell's own `kill`)."""
        try:
            result = self._run(["sh", "-c", f'kill -{signal} "$1"', "sh", str(pid)], {})
            if result.returncode != 0:
                log.warning("could not signal process %s in container %s: %s", pid, self.name, result.last_error_line())
        except Exception as error:  # the engine may be the thing that failed
            log.warning("could not signal process %s in container %s: %s", pid, self.name, error)

    def _environment(self, env: dict[str, str]) -> dict[str, str]:
        environment = {key: value for key, value in env.items() if key not in _OUTSIDE_ONLY}
        environment["PGPORT"] = str(self._inner_port)
        return environment

    def _exec(self, argv: list[str], env: dict[str, str], stdin: bool = False) -> ExecStream:
        from docker.errors import DockerException

        try:
            return ExecStream(self._api, self._container.id, argv, self._environment(env), stdin=stdin)
        except DockerException as error:
            raise BackupError(f"cannot run {argv[0]} in container '{self.name}': {first_line(error)}") from None

    def _run(self, argv: list[str], env: dict[str, str], stdin: Path | None = None) -> ToolResult:
        """Run a tool to its end: stdout collected (TOC listings, versions), stderr's tail kept; with
        `stdin`, that file is streamed into it meanwhile."""
        from docker.errors import DockerException

        stream = self._exec(argv, env, stdin=stdin is not None)
        problems: list[str] = []
        sender = None
        if stdin is not None:
            sender = threading.Thread(target=stream.send_file, args=(stdin, problems), daemon=True,
                                      name="tma-backup-stdin-stream")
            sender.start()
        stdout = bytearray()
        stderr = StderrTail()
        try:
            for number, data in stream.frames():
                if number == STDOUT:
                    stdout += data
                else:
                    stderr.add(data)
            if sender is not None:
                stream.stop_sending()
                sender.join()
            code = stream.exit_code()
        except (OSError, DockerException) as error:  # the engine went away: it cannot say how the tool ended
            raise BackupError(f"lost the connection to {argv[0]} in container '{self.name}': "
                              f"{first_line(error)}") from None
        finally:
            stream.close()
        message = stderr.text() + "".join(f"\nerror: {problem}" for problem in problems)
        return ToolResult(code if not problems else (code or 1), text(stdout), message)

    def _container_port(self) -> int:
        for item in self._container.attrs.get("Config", {}).get("Env") or []:
            key, _, value = item.partition("=")
            if key == "PGPORT" and value.isdigit():
                return int(value)
        return 5432

    def _exec_user_ids(self) -> tuple[int, int]:
        result = self._run(["sh", "-c", "id -u; id -g"], {})
        numbers = result.stdout.split()
        if result.returncode == 0 and len(numbers) == 2 and all(part.isdigit() for part in numbers):
            return int(numbers[0]), int(numbers[1])
        return 0, 0

    def _room_in_tmp(self) -> int | None:
        result = self._run(["df", "-Pk", "/tmp"], {})
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or len(lines) < 2:
            return None
        fields = lines[-1].split()
        return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None

    def _copy_in(self, archive: Path, jobs: int) -> str | None:
        """Copy the archive into a private folder under the container's /tmp for `pg_restore --jobs`;
        None (and the reason in the log) when it does not fit or the copy fails."""
        size = archive.stat().st_size
        room = self._room_in_tmp()
        if room is None or room < size + size // 10 + 64 * CHUNK:
            shown = "unknown" if room is None else f"{room // CHUNK} MiB"
            log.warning("parallel restore needs %s copied into container %s, but its /tmp has room for %s "
                        "(archive %d MiB): restoring with one job from a stream instead of --jobs=%d",
                        archive.name, self.name, shown, size // CHUNK, jobs)
            return None
        folder = f"tma-backup-restore-{uuid.uuid4().hex}"
        uid, gid = self._exec_user_ids()
        started = time.monotonic()
        try:
            self._api.put_archive(self._container.id, "/tmp", tar_stream(archive, folder, archive.name, uid, gid))
        except Exception as error:
            self._remove(f"/tmp/{folder}")
            log.warning("copying %s into container %s failed (%s): restoring with one job from a stream "
                        "instead of --jobs=%d", archive.name, self.name, first_line(error), jobs)
            return None
        log.info("copied %s (%d MiB) into container %s in %.1fs for a parallel restore (--jobs=%d)",
                 archive.name, size // CHUNK, self.name, time.monotonic() - started, jobs)
        return f"/tmp/{folder}"

    def _remove(self, folder: str) -> None:
        try:
            result = self._run(["rm", "-rf", "--", folder], {})
            if result.returncode != 0:
                log.warning("could not remove %s in container %s: %s", folder, self.name, result.last_error_line())
        except BackupError as error:
            log.warning("could not remove %s in container %s: %s", folder, self.name, error)

    def _addresses(self) -> dict[str, str]:
        """The container's IP addresses, each with the network it is on."""
        self._container.reload()
        networks = self._container.attrs.get("NetworkSettings", {}).get("Networks") or {}
        found: dict[str, str] = {}
        for network, details in networks.items():
            for key in ("IPAddress", "GlobalIPv6Address"):
                if details.get(key):
                    found[details[key]] = network
        return found

    def _find_route(self) -> dict[str, Any]:
        settings = self._settings
        # The connection from this worker crosses the network: it honours DB_SSLMODE / DB_SSLROOTCERT.
        credentials = {"user": settings.DB_USER, "password": settings.password, **ssl_parameters(settings)}
        addresses = self._addresses()
        host_network = self._container.attrs.get("HostConfig", {}).get("NetworkMode") == "host"
        candidates = [(settings.DB_HOST, settings.DB_PORT, "DB_HOST:DB_PORT")]
        candidates += [(address, self._inner_port, f"the container's address on network {network}")
                       for address, network in addresses.items()]
        tried: list[str] = []
        for host, port, what in candidates:
            try:
                served = _server_address(host, port, credentials, settings.DB_NAME)
            except psycopg.Error as error:
                tried.append(f"{host}:{port} ({first_line(error)})")
                continue
            if served in addresses or (host_network and what == "DB_HOST:DB_PORT"):
                self._route_note = f"{what} {host}:{port}"
                log.info("docker mode: psycopg reaches the server of container %s through %s (%s:%s)",
                         self.name, what, host, port)
                return {"host": host, "port": port, **credentials}
            tried.append(f"{host}:{port} (answers, but from {served or 'a socket'}, not from the container)")
        raise BackupError(
            f"cannot reach the PostgreSQL server of container '{self.name}' from this worker: tried "
            + "; ".join(tried) + ssl_note(credentials, " ".join(tried))
            + ". Set DB_HOST/DB_PORT to a port the container publishes, or run the worker on its network")


def _server_address(host: str, port: int, credentials: dict[str, Any], database: str) -> str:
    """`inet_server_addr()` of the server reached at host:port: where the connection ends."""
    last: psycopg.Error | None = None
    for dbname in dict.fromkeys(("postgres", database, "template1")):
        try:
            with psycopg.connect(host=host, port=port, dbname=dbname, connect_timeout=5,
                                 application_name="tma-backup", **credentials) as connection:
                row = connection.execute("SELECT host(inet_server_addr())").fetchone()
                served = str(row[0]) if row and row[0] else ""
                return served.removeprefix("::ffff:")
        except psycopg.OperationalError as error:
            last = error
            if "does not exist" not in str(error):
                raise
    assert last is not None
    raise last
