"""Which server a database lives on, as lock keys name it: the cluster's `system_identifier`, the same
whether it is reached as `localhost`, `127.0.0.1` or a container's name."""

from __future__ import annotations

from typing import Any

import psycopg

from worker.errors import BackupError
from worker.pg.database import connect
from worker.pg.executors import Executor
from worker.settings import Settings


def identity_of(connection: psycopg.Connection[Any]) -> str:
    """`pg-<system_identifier>` of the server `connection` is on."""
    row = connection.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    if row is None:
        raise BackupError("the server did not give its system_identifier")
    return f"pg-{row[0]}"


def server_identity(settings: Settings, executor: Executor, database: str) -> str:
    """`pg-<system_identifier>` of the server that holds `database` (asked in that database, else in
    `postgres`, for a database that does not exist yet); the configured address when the server cannot
    be reached: the run that needs it then fails on its own, with the server's own error."""
    for candidate in dict.fromkeys((database, "postgres")):
        try:
            with connect(executor.connect_kwargs(), candidate, autocommit=True) as connection:
                return identity_of(connection)
        except (BackupError, psycopg.Error):
            continue
    return settings.configured_server
