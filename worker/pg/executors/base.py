"""The executor seam: what the pipeline needs from pg_dump and pg_restore, wherever they run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.errors import BackupError


@dataclass
class ToolResult:
    returncode: int
    stdout: str
    stderr: str
    output_bytes: int | None = None  # a dump's archive bytes before our own compression, when we saw them

    def last_error_line(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "fatal" in line.lower()]
        return (errors or lines or [describe_returncode(self.returncode)])[-1]


def describe_returncode(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class ToolProcess(Protocol):
    """A client tool that is running; `wait` collects its outcome."""

    def wait(self) -> ToolResult: ...

    def kill(self) -> None: ...

    def poll(self) -> int | None: ...


class Executor(Protocol):
    mode: str  # "host" or "docker", as written to .meta

    def describe(self) -> str:
        """One line: which tools, where, and why this mode was chosen."""
        ...

    def meta_fields(self) -> dict[str, str]:
        """Extra `.meta` keys (for example the container)."""
        ...

    def connect_kwargs(self) -> dict[str, Any]:
        """psycopg connection parameters reaching the same server as the tools."""
        ...

    def tool_major(self, tool: str) -> int: ...

    def start_dump(self, options: list[str], env: dict[str, str], output: Path,
                   zstd_level: int | None = None) -> ToolProcess:
        """Start pg_dump writing a custom-format archive to `output`, compressed by this process with
        zstd at `zstd_level` when one is given (the `.dump.zst` fast mode)."""
        ...

    def list_archive(self, archive: Path, env: dict[str, str]) -> ToolResult:
        """`pg_restore --list` of a local archive file (a `.dump.zst` is decompressed on the way)."""
        ...

    def restore(self, options: list[str], env: dict[str, str], archive: Path) -> ToolResult:
        """`pg_restore` of a local archive file with the given options."""
        ...


_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def parse_tool_major(version_output: str, tool: str) -> int:
    match = _VERSION.search(version_output)
    if not match:
        raise BackupError(f"cannot read the version of {tool} from {version_output.strip()!r}")
    return int(match[1])
