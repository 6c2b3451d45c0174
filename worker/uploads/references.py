"""The uploads the database references, read inside the dump's snapshot (so rows and the reference
list are the same moment), kept in a file beside the run's partial dump until the cross-check."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from worker.archive.meta import write_atomically
from worker.errors import BackupError, first_line


@dataclass(frozen=True)
class Reference:
    path: str
    size: int | None  # the plain size TMA records, when the query returns one


def read_references(connection: psycopg.Connection[Any], query: str) -> list[Reference]:
    """Run UPLOADS_REFERENCES_QUERY in the current transaction (under a savepoint: a failing query
    must not end the transaction whose snapshot pg_dump uses). First column: the path (text); an
    optional second: the plain size."""
    try:
        with connection.transaction():  # a savepoint inside the snapshot's transaction
            cursor = connection.execute(query)  # the operator's own query, by design
            description = cursor.description
            rows = cursor.fetchall()
    except psycopg.Error as error:
        raise BackupError(f"UPLOADS_REFERENCES_QUERY failed: {first_line(error)}") from None
    if not description:
        raise BackupError("UPLOADS_REFERENCES_QUERY returned no rows set: it must be a SELECT of the uploads' paths")
    text_oids = {25, 1043, 1042, 19}  # text, varchar, bpchar, name
    if description[0].type_code not in text_oids:
        raise BackupError("UPLOADS_REFERENCES_QUERY must return the path as its first column, as text "
                          f"(it returned column {description[0].name!r} of another type)")
    references = []
    for row in rows:
        if row[0] is None:
            continue
        size = row[1] if len(row) > 1 and isinstance(row[1], int) else None
        references.append(Reference(str(row[0]), size))
    return references


def escapes(path: str) -> bool:
    """A reference that would lead outside UPLOAD_DIR (absolute, `..`, NUL, empty): never read."""
    if not path or "\0" in path or path.startswith("/") or path.startswith("\\"):
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../") or normal == "."


def references_path(dump: Path) -> Path:
    from worker.archive import catalogue

    return catalogue.partial_path(dump).with_name(catalogue.partial_path(dump).name + ".refs")


def save(path: Path, references: list[Reference]) -> None:
    write_atomically(path, "\n".join(json.dumps([item.path, item.size]) for item in references))


def load(path: Path) -> list[Reference]:
    if not os.path.exists(path):
        return []
    references = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item, size = json.loads(line)
            references.append(Reference(str(item), int(size) if size is not None else None))
    return references
