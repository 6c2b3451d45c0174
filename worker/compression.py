"""BACKUP_COMPRESSION: pg_dump's own spellings, checked before anything runs."""

from __future__ import annotations

import re

_SPELLINGS = re.compile(r"^(?:(?P<level>[0-9])|(?P<method>gzip|lz4|zstd|none)(?::(?P<method_level>[0-9]{1,2}))?)$")
_NEEDS_PG16 = {"lz4", "zstd"}


def parse_compression(value: str) -> str:
    """Return the `--compress=` value for pg_dump, or raise ValueError with what is accepted."""
    match = _SPELLINGS.match(value.strip())
    if not match:
        raise ValueError("must be 0-9, gzip:N, lz4, lz4:N, zstd, zstd:N or none (pg_dump's spellings)")
    if match["level"] is not None:
        return match["level"]
    level = match["method_level"]
    if match["method"] == "gzip" and level is not None and not 1 <= int(level) <= 9:
        raise ValueError("gzip level must be 1-9")
    return value.strip()


def check_supported(value: str, pg_dump_major: int) -> None:
    """pg_dump 15 knows only gzip levels; lz4 and zstd arrived with pg_dump 16."""
    method = value.split(":", 1)[0]
    if method in _NEEDS_PG16 and pg_dump_major < 16:
        raise ValueError(
            f"BACKUP_COMPRESSION={value} needs pg_dump 16 or newer; this pg_dump is {pg_dump_major}. "
            "Use a gzip level (0-9) or newer client tools."
        )
