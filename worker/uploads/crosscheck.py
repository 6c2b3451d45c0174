"""The cross-check: every upload the database references (inside the dump's snapshot) must be in the
set, with the size the database records where it records one. TMA Cloud stores each upload encrypted
as `[16-byte IV][data][16-byte tag]`: exactly 32 bytes longer than the plain size it records.

Files no row references are fine (uploads in flight, TMA's orphan cleanup): counted, not reported.
A reference that would lead outside UPLOAD_DIR (absolute, `..`, a symbolic link) is reported and never read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.uploads.references import Reference, escapes

ENCRYPTION_OVERHEAD = 32  # AES-256-GCM: a 16-byte IV before the data, a 16-byte tag after it
NAMES_SHOWN = 20  # the .meta and the run's result name at most this many; the count is always exact


@dataclass
class CrossCheck:
    referenced: int
    missing: list[str] = field(default_factory=list)  # absent, or not the size the database records
    escaping: list[str] = field(default_factory=list)
    unreferenced: int = 0

    def fields(self) -> dict[str, Any]:
        return {
            "referenced": self.referenced,
            "missing": len(self.missing),
            "missing_names": self.missing[:NAMES_SHOWN],
            "escaping": len(self.escaping),
            "escaping_names": self.escaping[:NAMES_SHOWN],
            "unreferenced": self.unreferenced,
        }


def size_matches(stored: int, recorded: int | None) -> bool:
    return recorded is None or stored in (recorded, recorded + ENCRYPTION_OVERHEAD)


def cross_check(references: list[Reference], files: dict[str, int], links: Sequence[str] = (),
                unreadable: Sequence[str] = ()) -> CrossCheck:
    """Compare what the database references with what the set holds (path → size)."""
    result = CrossCheck(referenced=len(references))
    link_set, unreadable_set = set(links), set(unreadable)
    wanted: set[str] = set()
    for reference in references:
        path = reference.path.removeprefix("./")
        if escapes(path) or path in link_set:
            result.escaping.append(reference.path)
            continue
        wanted.add(path)
        size = files.get(path)
        if size is None or path in unreadable_set or not size_matches(size, reference.size):
            result.missing.append(reference.path)
    result.unreferenced = sum(1 for path in files if path not in wanted)
    result.missing.sort()
    result.escaping.sort()
    return result


def key_fingerprint(key: str) -> str:
    """A SHA-256 of FILE_ENCRYPTION_KEY: tells which key a set needs, never the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
