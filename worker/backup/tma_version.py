"""Which TMA Cloud a set belongs to: the newest migration its database has applied (TMA Cloud applies
`backend/migrations/*.sql` at start-up and records each in its `migrations` table, `version` =
`031_create_client_heartbeats`; the names sort), read inside the dump's own snapshot. A set taken by a
newer TMA Cloud, restored under an older one, breaks the application: a restore says so first.

With docker mode the worker also sees TMA Cloud's app container (`tma-cloud-app`, as TMA's compose file
names it): its image and its `version` label go into the `.meta` too."""

from __future__ import annotations

from typing import Any

import psycopg

APP_CONTAINER = "tma-cloud-app"


def newest_migration(connection: psycopg.Connection[Any]) -> str | None:
    """The newest applied migration of TMA Cloud in this database (None: not a TMA Cloud database)."""
    row = connection.execute("SELECT to_regclass('public.migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    newest = connection.execute("SELECT max(version) FROM public.migrations").fetchone()
    return str(newest[0]) if newest and newest[0] is not None else None


def app_fields(client: Any) -> dict[str, str]:
    """TMA Cloud's app container as the Docker engine shows it: `tma_app_image`, `tma_app_version` (from
    the image's `version` label). Empty when there is no such container or the engine will not say."""
    try:
        container = client.containers.get(APP_CONTAINER)
        config = container.attrs.get("Config", {})
    except Exception:  # no container of that name, or no engine: nothing to record
        return {}
    fields = {"tma_app_image": str(config.get("Image", ""))}
    version = (config.get("Labels") or {}).get("version")
    if version:
        fields["tma_app_version"] = str(version)
    return {key: value for key, value in fields.items() if value}


def is_newer(candidate: str | None, than: str | None) -> bool:
    """Whether migration `candidate` comes after `than` (names sort: `031_…` after `030_…`)."""
    return candidate is not None and than is not None and candidate > than
