"""The PostgreSQL client tools' connection settings, handed over in their environment (never argv)."""

from __future__ import annotations

from worker.settings import Settings


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
    if settings.password:
        environment["PGPASSWORD"] = settings.password
    return environment
