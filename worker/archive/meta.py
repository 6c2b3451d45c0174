"""The `.meta` sidecar: the seed's keys in the seed's order, then ours, then per-table row counts.

```
timestamp=20260115T020000Z
database=tma_cloud_storage
...
sha256=…
<our keys>

# Table row counts at backup time
public.users=5
```
Values and table keys are escaped (backslash, newline, carriage return) so that any database or table
name round-trips. Readers ignore keys they do not know.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

SEED_KEYS = (
    "timestamp",
    "database",
    "user",
    "mode",
    "format",
    "compression",
    "toc_entries",
    "file_size",
    "duration_seconds",
    "sha256",
)
ROW_COUNTS_HEADER = "# Table row counts at backup time"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COUNT = re.compile(r"^[0-9]+$")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
MAX_META_BYTES = 64 * 1024 * 1024  # far beyond any real .meta (one line per table)
_PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_$]*$")


class MetaError(ValueError):
    """A `.meta` file cannot be read as one."""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), text)


def table_key(schema: str, table: str) -> str:
    """`schema.table` as the seed wrote it; names that need it are quoted the way SQL quotes them."""

    def part(name: str) -> str:
        return name if _PLAIN_IDENTIFIER.match(name) else '"' + name.replace('"', '""') + '"'

    return f"{part(schema)}.{part(table)}"


def human_size(size: int) -> str:
    """Like `du -h`/`ls -sh`: 12M, 1.5G, 900K."""
    units = ["", "K", "M", "G", "T"]
    value = float(size)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            if unit == "":
                return f"{int(value)}"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class BackupMeta:
    timestamp: str
    database: str
    user: str
    mode: str
    compression: str
    toc_entries: int
    file_size_bytes: int
    duration_seconds: float
    sha256: str
    row_counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    format: str = "custom"

    def render(self) -> str:
        seed_values = {
            "timestamp": self.timestamp,
            "database": self.database,
            "user": self.user,
            "mode": self.mode,
            "format": self.format,
            "compression": self.compression if self.compression.startswith("zstd-stream") else f"--compress={self.compression}",
            "toc_entries": str(self.toc_entries),
            "file_size": human_size(self.file_size_bytes),
            "duration_seconds": str(round(self.duration_seconds)),
            "sha256": self.sha256,
        }
        ours = {
            "file_size_bytes": str(self.file_size_bytes),
            "duration_seconds_exact": f"{self.duration_seconds:.3f}",
            **self.extra,
        }
        lines = [f"{key}={_escape(value)}" for key, value in {**seed_values, **ours}.items()]
        lines += ["", ROW_COUNTS_HEADER]
        lines += [f"{_escape(key)}={count}" for key, count in self.row_counts.items()]
        return "\n".join(lines) + "\n"


def parse_meta(text: str) -> BackupMeta:
    """Parse a `.meta` file's text. Raises MetaError naming the first problem."""
    values: dict[str, str] = {}
    counts: dict[str, int] = {}
    in_counts = False
    # Split on "\n" only: str.splitlines() also splits on \x85, \u2028 and other characters that may
    # stand unescaped inside a database or table name.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("#"):
            in_counts = in_counts or line.strip() == ROW_COUNTS_HEADER
            continue
        key, separator, value = line.rpartition("=") if in_counts else line.partition("=")
        if not separator or not key:
            raise MetaError(f"line {number} is not key=value")
        if in_counts:
            if not _COUNT.match(value):
                raise MetaError(f"line {number}: row count {value!r} is not a whole number")
            counts[_unescape(key)] = int(value)
        else:
            values[key] = _unescape(value)
    missing = [key for key in ("timestamp", "database", "toc_entries", "sha256") if key not in values]
    if missing:
        raise MetaError(f"missing {', '.join(missing)}")
    if not _SHA256.match(values["sha256"]):
        raise MetaError("sha256 is not 64 hexadecimal digits")
    try:
        toc_entries = int(values["toc_entries"])
        size = int(values.get("file_size_bytes", "-1"))
        duration = float(values.get("duration_seconds_exact", values.get("duration_seconds", "0")))
    except ValueError as error:
        raise MetaError(f"bad number ({error})") from None
    if not math.isfinite(duration) or duration < 0:
        raise MetaError(f"duration {duration} is not a number of seconds")
    known = set(SEED_KEYS) | {"file_size_bytes", "duration_seconds_exact"}
    return BackupMeta(
        timestamp=values["timestamp"],
        database=values["database"],
        user=values.get("user", ""),
        mode=values.get("mode", ""),
        format=values.get("format", "custom"),
        compression=values.get("compression", "").removeprefix("--compress="),
        toc_entries=toc_entries,
        file_size_bytes=size,
        duration_seconds=duration,
        sha256=values["sha256"],
        row_counts=counts,
        extra={key: value for key, value in values.items() if key not in known},
    )


def read_meta(path: Path) -> BackupMeta:
    """Read and parse a `.meta`. Only a regular file is read: a FIFO (which would block), a device or a
    folder named like one is refused, and a symlink is followed only to a regular file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MetaError(f"{path.name} does not exist") from None
    except OSError as error:
        raise MetaError(f"{path.name} cannot be read ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise MetaError(f"{path.name} is not a regular file")
        if status.st_size > MAX_META_BYTES:
            raise MetaError(f"{path.name} is {status.st_size} bytes: not a .meta")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        raise MetaError(f"{path.name} cannot be read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise MetaError(f"{path.name} cannot be read ({error})") from None
    finally:
        os.close(descriptor)
    return parse_meta(text)


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Write to a temporary name, fsync, rename into place, fsync the folder."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
