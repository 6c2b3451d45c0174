"""Run the PostgreSQL client tools installed on this host, as argv lists, secrets in the environment.

Which tools: those of the server's own major when this host has them side by side with others, in
Debian's layout (/usr/lib/postgresql/<major>/bin: the worker image carries 15, 17 and 18), else the ones
on PATH. A pg_dump newer than its server writes archives its own server cannot restore: pg_restore of
that newer major sets parameters the older server does not know (`SET transaction_timeout` from 17 on:
a PostgreSQL 15 refuses it), and an older pg_restore cannot read the newer archive ("unsupported version
(1.16) in file header"). PostgreSQL promises a dump loads into servers of the pg_dump's major or newer.
`pg_restore --list` reads archives only: the one on PATH (the newest) does it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg

from worker.archive import streams
from worker.children import die_with_parent
from worker.errors import BackupError
from worker.pg.environment import ssl_parameters
from worker.pg.executors.base import ToolResult, parse_tool_major
from worker.settings import Settings

# Variables that would silently redirect the tools to another server or user.
_SCRUBBED = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE", "PGPASSFILE", "PGOPTIONS")


def scrubbed_environment(extra: dict[str, str]) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in _SCRUBBED}
    environment.update(extra)
    return environment


# Client tools of several majors side by side (Debian's postgresql-client-<major> packages)
CLIENT_FOLDERS = Path("/usr/lib/postgresql")


def _server_major(connect_kwargs: dict[str, Any], databases: tuple[str, ...]) -> int | None:
    """The server's major, asked in the first of `databases` that exists; None when it cannot be asked
    (the run then fails on its own connection, with the server's own error)."""
    for dbname in dict.fromkeys(databases):
        try:
            with psycopg.connect(dbname=dbname, connect_timeout=10, application_name="tma-backup",
                                 **connect_kwargs) as connection:
                return connection.info.server_version // 10000
        except psycopg.Error as error:
            if "does not exist" not in str(error) and "permission denied" not in str(error):
                return None
    return None


@functools.lru_cache(maxsize=16)
def _installed_major(path: str, tool: str) -> int:
    """`tool --version` of the binary at `path`, asked once per process."""
    output = subprocess.run([path, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return parse_tool_major(output.stdout, tool)


class HostProcess:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    def poll(self) -> int | None:
        return self._process.poll()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()

    def wait(self) -> ToolResult:
        stdout, stderr = self._process.communicate()
        return ToolResult(
            self._process.returncode,
            stdout.decode("utf-8", "replace") if stdout else "",
            stderr.decode("utf-8", "replace") if stderr else "",
        )


class StreamedDump:
    """pg_dump writing its archive to a pipe while a thread of this process compresses it (zstd) into
    the output file: two cores at work instead of one."""

    def __init__(self, argv: list[str], env: dict[str, str], output: Path, zstd_level: int) -> None:
        self._output = output
        self._problem: str | None = None
        self._stderr = b""
        self._archive_bytes: int | None = None
        try:
            target = streams.open_output(output, zstd_level)
        except OSError as error:
            raise BackupError(f"cannot write {output.name}: {error.strerror}") from None
        try:
            self._process = subprocess.Popen(argv, env=scrubbed_environment(env), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             preexec_fn=die_with_parent)
        except OSError as error:
            target.close()
            raise BackupError(f"cannot run {argv[0]}: {error.strerror}") from None
        self._pump = threading.Thread(target=self._compress, args=(target,), name="zstd-stream", daemon=True)
        self._errors = threading.Thread(target=self._read_stderr, name="pg_dump-stderr", daemon=True)
        self._pump.start()
        self._errors.start()

    def _compress(self, target: Any) -> None:
        try:
            self._archive_bytes = streams.pump(self._process.stdout, target)  # type: ignore[arg-type]
        except OSError as error:
            self._problem = f"cannot write {self._output.name}: {error.strerror or error}"
            self._process.kill()

    def _read_stderr(self) -> None:
        self._stderr = self._process.stderr.read()  # type: ignore[union-attr]

    def poll(self) -> int | None:
        return None if self._pump.is_alive() else self._process.poll()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()

    def wait(self) -> ToolResult:
        self._process.wait()
        self._pump.join()
        self._errors.join()
        stderr = self._stderr.decode("utf-8", "replace")
        if self._problem:
            return ToolResult(self._process.returncode or 1, "", f"{stderr}\nerror: {self._problem}".strip())
        return ToolResult(self._process.returncode, "", stderr, self._archive_bytes)


def _feed(source: Path, descriptor: int) -> None:
    """Write the decompressed archive into a pipe; the reader may stop early (--list reads the TOC)."""
    try:
        with streams.open_archive(source) as archive, open(descriptor, "wb", buffering=0) as pipe:
            while chunk := archive.read(streams.CHUNK):
                pipe.write(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except (OSError, ValueError):
        pass  # pg_restore sees the input end early and says what is wrong with it


class HostExecutor:
    mode = "host"

    def __init__(self, settings: Settings, reason: str = "DB_MODE=host") -> None:
        self._settings = settings
        self._reason = reason
        self._folder: str | None = None  # the server's own major's tools, "" for PATH's; asked once

    def _tool(self, tool: str) -> str:
        """`tool` of the server's own major when this host has it in CLIENT_FOLDERS, else `tool` (PATH)."""
        if self._folder is None:
            major = _server_major(self.connect_kwargs(), (self._settings.DB_NAME, "postgres", "template1"))
            folder = CLIENT_FOLDERS / str(major) / "bin"
            ours = major is not None and all((folder / name).is_file() for name in ("pg_dump", "pg_restore"))
            self._folder = str(folder) if ours else ""
        return os.path.join(self._folder, tool) if self._folder else tool

    def describe(self) -> str:
        where = shutil.which(self._tool("pg_dump")) or "pg_dump (not found)"
        return f"host tools ({where}) against {self._settings.DB_HOST}:{self._settings.DB_PORT}; {self._reason}"

    def meta_fields(self) -> dict[str, str]:
        return {}

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": self._settings.DB_HOST,
            "port": self._settings.DB_PORT,
            "user": self._settings.DB_USER,
            "password": self._settings.password,
            **ssl_parameters(self._settings),  # DB_SSLMODE / DB_SSLROOTCERT, as the tools get them
        }

    def tool_major(self, tool: str) -> int:
        path = shutil.which(self._tool(tool))
        if path is None:
            raise BackupError(
                f"{tool} is not installed on this host: install the PostgreSQL client "
                "(apt-get install postgresql-client) or use docker mode (DB_CONTAINER)"
            )
        return _installed_major(path, tool)

    def _start(self, argv: list[str], env: dict[str, str], stdin: Path | None = None) -> HostProcess:
        try:
            stdin_handle = open(stdin, "rb") if stdin else subprocess.DEVNULL
            process = subprocess.Popen(
                argv,
                env=scrubbed_environment(env),
                stdin=stdin_handle,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent,
            )
        except OSError as error:
            raise BackupError(f"cannot run {argv[0]}: {error.strerror}") from None
        finally:
            if stdin:
                stdin_handle.close()  # type: ignore[union-attr]
        return HostProcess(process)

    def start_dump(self, options: list[str], env: dict[str, str], output: Path,
                   zstd_level: int | None = None) -> HostProcess | StreamedDump:
        if zstd_level is not None:
            return StreamedDump([self._tool("pg_dump"), *options], env, output, zstd_level)
        return self._start([self._tool("pg_dump"), *options, f"--file={output}"], env)

    def list_archive(self, archive: Path, env: dict[str, str]) -> ToolResult:
        if not streams.is_compressed_stream(archive):
            return self._start(["pg_restore", "--list", "--", str(archive)], env).wait()
        read_end, write_end = os.pipe()
        feeder = threading.Thread(target=_feed, args=(archive, write_end), daemon=True)
        try:
            process = subprocess.Popen(["pg_restore", "--list"], env=scrubbed_environment(env), stdin=read_end,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        except OSError as error:
            os.close(write_end)
            raise BackupError(f"cannot run pg_restore: {error.strerror}") from None
        finally:
            os.close(read_end)
        feeder.start()
        result = HostProcess(process).wait()
        feeder.join()
        return result

    def restore(self, options: list[str], env: dict[str, str], archive: Path) -> ToolResult:
        return self._start([self._tool("pg_restore"), *options, "--", str(archive)], env).wait()
