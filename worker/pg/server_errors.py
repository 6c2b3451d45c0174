"""Telling "the database server is not there (any more)" apart from every other failure: only the
former is worth another attempt (BACKUP_RETRIES)."""

from __future__ import annotations

import re

import psycopg

from worker.errors import BackupError


class ServerUnavailable(BackupError):
    """PostgreSQL could not be reached, or went away during the dump (a restart, a failover, the network).
    Worth another attempt: the Celery dump task retries it (BACKUP_RETRIES, with backoff)."""


# What libpq, psycopg and pg_dump say when the server is not there (any more); not "database does not
# exist", a bad password or a permission error, which another attempt would not cure.
_SERVER_GONE = re.compile(
    r"connection refused|could not connect to server|server closed the connection"
    r"|terminating connection due to administrator command|no connection to the server"
    r"|the database system is (?:shutting down|starting up|in recovery mode|not (?:yet )?accepting connections)"
    r"|could not (?:receive data from|send data to) server|connection timed out|timeout expired"
    r"|no route to host|network is unreachable|ssl syscall error",
    re.IGNORECASE,
)
_SERVER_GONE_STATES = {"57P01", "57P02", "57P03"}  # admin shutdown, crash shutdown, cannot connect now


def server_gone(error: BaseException | str) -> bool:
    """Whether an error (or a tool's stderr) says that the server is unreachable or went away."""
    if isinstance(error, str):
        return bool(_SERVER_GONE.search(error))
    # worker.database.connect() re-raises psycopg's error as a BackupError `from None`: look behind it.
    for candidate in (error, error.__cause__, error.__context__):
        if isinstance(candidate, psycopg.Error):
            sqlstate = candidate.sqlstate or ""
            if sqlstate.startswith("08") or sqlstate in _SERVER_GONE_STATES:
                return True
            if isinstance(candidate, psycopg.OperationalError) and _SERVER_GONE.search(str(candidate)):
                return True
    return False
