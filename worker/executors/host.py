"""Run the PostgreSQL client tools installed on this host, as argv lists, secrets in the environment."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from worker.errors import BackupError
from worker.executors.base import ToolResult, parse_tool_major
from worker.settings import Settings

# Variables that would silently redirect the tools to another server or user.
_SCRUBBED = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE", "PGPASSFILE", "PGOPTIONS")


def tool_environment(extra: dict[str, str]) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in _SCRUBBED}
    environment.update(extra)
    return environment


class HostProcess:
    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path | None = None) -> None:
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


class HostExecutor:
    mode = "host"

    def __init__(self, settings: Settings, reason: str = "DB_MODE=host") -> None:
        self._settings = settings
        self._reason = reason

    def describe(self) -> str:
        where = shutil.which("pg_dump") or "pg_dump (not found)"
        return f"host tools ({where}) against {self._settings.DB_HOST}:{self._settings.DB_PORT}; {self._reason}"

    def meta_fields(self) -> dict[str, str]:
        return {}

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": self._settings.DB_HOST,
            "port": self._settings.DB_PORT,
            "user": self._settings.DB_USER,
            "password": self._settings.password,
        }

    @functools.cache
    def tool_major(self, tool: str) -> int:
        path = shutil.which(tool)
        if path is None:
            raise BackupError(
                f"{tool} is not installed on this host: install the PostgreSQL client "
                "(apt-get install postgresql-client) or use docker mode (DB_CONTAINER)"
            )
        output = subprocess.run([path, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return parse_tool_major(output.stdout, tool)

    def _start(self, argv: list[str], env: dict[str, str], stdin: Path | None = None) -> HostProcess:
        try:
            stdin_handle = open(stdin, "rb") if stdin else subprocess.DEVNULL
            process = subprocess.Popen(
                argv,
                env=tool_environment(env),
                stdin=stdin_handle,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as error:
            raise BackupError(f"cannot run {argv[0]}: {error.strerror}") from None
        finally:
            if stdin:
                stdin_handle.close()  # type: ignore[union-attr]
        return HostProcess(process)

    def start_dump(self, options: list[str], env: dict[str, str], output: Path) -> HostProcess:
        return self._start(["pg_dump", *options, f"--file={output}"], env)

    def list_archive(self, archive: Path, env: dict[str, str]) -> ToolResult:
        return self._start(["pg_restore", "--list", "--", str(archive)], env).wait()

    def restore(self, options: list[str], env: dict[str, str], archive: Path) -> ToolResult:
        return self._start(["pg_restore", *options, "--", str(archive)], env).wait()
