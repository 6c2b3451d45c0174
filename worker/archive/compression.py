"""BACKUP_COMPRESSION: pg_dump's own spellings, or our `zstd-stream[:N]` fast mode; checked up front.

- `0`-`9`, `gzip:N`, `none`: pg_dump compresses (custom format, `.dump`; any pg_restore reads it).
- `lz4[:N]`, `zstd[:N]`: pg_dump 16+ compresses with them itself.
- `zstd-stream[:N]`: pg_dump writes uncompressed (`--compress=0`) into a pipe and this process
  compresses with zstd (level N, default 1) on the other core, into `.dump.zst`. Works with
  PostgreSQL 15 tools; verify, restore and drills decompress it transparently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.archive.catalogue import DUMP_SUFFIX, ZST_DUMP_SUFFIX

_SPELLINGS = re.compile(
    r"^(?:(?P<level>[0-9])|(?P<method>gzip|lz4|zstd|none|zstd-stream)(?::(?P<method_level>[0-9]{1,2}))?)$")
_NEEDS_PG16 = {"lz4", "zstd"}
STREAM = "zstd-stream"
DEFAULT_STREAM_LEVEL = 1  # keeps pace with pg_dump on one core; level 3 does not (bench/README.md)


@dataclass(frozen=True)
class Compression:
    setting: str  # as written in BACKUP_COMPRESSION
    pg_dump_value: str  # pg_dump's --compress=
    zstd_level: int | None  # set in the zstd-stream mode: this process compresses
    suffix: str  # .dump or .dump.zst

    @property
    def label(self) -> str:
        """The `.meta` value of `compression=`: the seed's `--compress=N`, or our stream mode."""
        return f"--compress={self.pg_dump_value}" if self.zstd_level is None else f"{STREAM}:{self.zstd_level}"


def parse_compression(value: str) -> Compression:
    """Raise ValueError with what is accepted."""
    text = value.strip()
    match = _SPELLINGS.match(text)
    if not match:
        raise ValueError(
            "must be 0-9, gzip:N, lz4, lz4:N, zstd, zstd:N, none (pg_dump's spellings) or zstd-stream[:N]")
    if match["level"] is not None:
        return Compression(text, match["level"], None, DUMP_SUFFIX)
    method, level = match["method"], match["method_level"]
    if method == "gzip" and level is not None and not 1 <= int(level) <= 9:
        raise ValueError("gzip level must be 1-9")
    if method == STREAM:
        zstd_level = int(level) if level is not None else DEFAULT_STREAM_LEVEL
        if not 1 <= zstd_level <= 19:
            raise ValueError("zstd-stream level must be 1-19")
        return Compression(text, "0", zstd_level, ZST_DUMP_SUFFIX)
    return Compression(text, text, None, DUMP_SUFFIX)


def check_supported(compression: Compression, pg_dump_major: int) -> None:
    """pg_dump 15 knows only gzip levels; lz4 and zstd arrived with pg_dump 16."""
    method = compression.pg_dump_value.split(":", 1)[0]
    if method in _NEEDS_PG16 and pg_dump_major < 16:
        raise ValueError(
            f"BACKUP_COMPRESSION={compression.setting} needs pg_dump 16 or newer; this pg_dump is {pg_dump_major}. "
            f"Use a gzip level (0-9), {STREAM} (works with any pg_dump), or newer client tools."
        )


def is_compressed(meta_value: str) -> bool:
    """Whether a backup whose `.meta` says `compression=<meta_value>` is compressed already (restic's own
    compression would only spend CPU on it). Unknown spellings count as uncompressed: restic then tries."""
    try:
        compression = parse_compression(meta_value)
    except ValueError:
        return False
    return compression.zstd_level is not None or compression.pg_dump_value not in {"0", "none"}
