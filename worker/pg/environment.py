"""The PostgreSQL client tools' connection settings, handed over in their environment (never argv), and
the TLS settings (DB_SSLMODE, DB_SSLROOTCERT) that psycopg and the tools share."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.settings import Settings

# What libpq and the server say when a connection fails for TLS reasons: no SSL on the server, a
# certificate that does not verify or names another host, a missing CA file, a pg_hba.conf line that
# wants (or refuses) encryption.
_TLS_PROBLEM = re.compile(r"ssl|certificate|encryption|\btls\b", re.IGNORECASE)


def ssl_parameters(settings: Settings) -> dict[str, str]:
    """libpq's `sslmode` (always given, so that a stray PGSSLMODE in the worker's environment cannot make
    psycopg and the tools differ) and `sslrootcert` (only when DB_SSLROOTCERT is set)."""
    parameters: dict[str, str] = {"sslmode": settings.DB_SSLMODE}
    if settings.DB_SSLROOTCERT is not None:
        parameters["sslrootcert"] = str(settings.DB_SSLROOTCERT)
    return parameters


def ssl_note(connect_kwargs: Mapping[str, Any], message: str) -> str:
    """` (DB_SSLMODE=…[, DB_SSLROOTCERT=…])` when a connection failure is about TLS, else empty: the
    operator learns which setting decided it."""
    mode = connect_kwargs.get("sslmode")
    if not mode or not _TLS_PROBLEM.search(message):
        return ""
    rootcert = connect_kwargs.get("sslrootcert")
    return f" (DB_SSLMODE={mode}" + (f", DB_SSLROOTCERT={rootcert})" if rootcert else ")")


def tool_environment(settings: Settings, database: str) -> dict[str, str]:
    """Connection settings for the client tools: the environment, never argv."""
    environment = {
        "PGHOST": settings.DB_HOST,
        "PGPORT": str(settings.DB_PORT),
        "PGUSER": settings.DB_USER,
        "PGDATABASE": database,
        "PGAPPNAME": "tma-backup",
        "PGCONNECT_TIMEOUT": "10",
    }
    ssl = ssl_parameters(settings)
    environment["PGSSLMODE"] = ssl["sslmode"]
    if "sslrootcert" in ssl:
        environment["PGSSLROOTCERT"] = ssl["sslrootcert"]
    if settings.password:
        environment["PGPASSWORD"] = settings.password
    return environment
