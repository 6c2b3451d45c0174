"""Sets name the server they came from (issue 20): two PostgreSQL clusters, each with a database of the
same name (production and staging, both with TMA Cloud's default name), share one repository. Each
server's `latest`, retention, status and catch-up see only its own sets; a new server (a rebuild) is
told whose sets there are and restores one by id; sets made before the tag keep working.

Real services: the session's PostgreSQL and a second private cluster, restic with a local repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import services, tma_cloud
from tests.conftest import base_env, private_cluster, run_cli
from tests.helpers import error_lines
from tests.test_repository import Repository, local_repository, restic, restic_init, snapshots, tag_value
from tests.test_restore import digests

SHARED_NAME = "tma_cloud_storage_shared"


@pytest.fixture(scope="module")
def staging_pg() -> Iterator[services.PostgresServer]:
    """A second private cluster (`initdb` + `postgres`, as the session's): another server, another
    system_identifier."""
    yield from private_cluster()


def server_id(server: services.PostgresServer) -> str:
    with server.connect() as connection:
        return f"pg-{connection.execute('SELECT system_identifier FROM pg_control_system()').fetchone()[0]}"


class Deployment:
    """One server's database of the shared name, with its own BACKUP_DIR, on the shared repository."""

    def __init__(self, server: services.PostgresServer, repository: Repository, folder: Path, **settings: str) -> None:
        self.server = server
        with server.connect(autocommit=True) as admin:
            tma_cloud.drop_database(admin, SHARED_NAME)
        tma_cloud.create_populated(server, SHARED_NAME)
        folder.mkdir()
        self.folder = folder
        self.env = base_env(server, folder / "backups", DB_NAME=SHARED_NAME, **repository.settings, **settings)

    def run(self, *args: str) -> Any:
        return run_cli(list(args), self.env, self.folder)

    def backup(self) -> None:
        result = self.run("backup")
        assert result.returncode == 0, result.output

    def digests(self) -> dict[str, str]:
        return digests(self.server, SHARED_NAME)

    def drop(self) -> None:
        with self.server.connect(autocommit=True) as admin:
            for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                         (f"{SHARED_NAME}%",)).fetchall():
                tma_cloud.drop_database(admin, name)


@pytest.fixture
def shared(pg, staging_pg, restic_bin, tmp_path) -> Iterator[tuple[Deployment, Deployment, Repository]]:
    repository = restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))
    production = Deployment(pg, repository, tmp_path / "production")
    staging = Deployment(staging_pg, repository, tmp_path / "staging")
    yield production, staging, repository
    production.drop()
    staging.drop()


def sets_of(restic_bin: str, repository: Repository, server: str) -> list[dict[str, Any]]:
    return [item for item in snapshots(restic_bin, repository)
            if tag_value(item, "db:") == SHARED_NAME and tag_value(item, "server:") == server]


def test_latest_on_each_server_is_its_own_newest_set_never_the_other_servers(shared, restic_bin):
    production, staging, repository = shared
    production_rows = production.digests()
    production.backup()
    staging.backup()  # newer, same database name, same repository
    assert production_rows != staging.digests()
    for deployment in (production, staging):
        [one] = sets_of(restic_bin, repository, server_id(deployment.server))
        assert tag_value(one, "part:") == "database"

    with production.server.connect(SHARED_NAME, autocommit=True) as connection:
        connection.execute("DELETE FROM audit_log")  # what the restore must bring back
    restored = production.run("restore", "--from-repository", "latest", "--confirm", SHARED_NAME)
    assert restored.returncode == 0, restored.output
    assert production.digests() == production_rows, "production's own rows, not staging's newer set"

    listed = production.run("repository", "list", "--json")
    servers = sorted(json.loads(line)["server"] for line in listed.stdout.splitlines())
    assert servers == sorted([server_id(production.server), server_id(staging.server)])


def test_retention_and_status_of_one_server_never_touch_or_count_the_others_sets(shared, restic_bin):
    production, staging, repository = shared
    for deployment in (production, staging):  # count rules only: a set a day (by default a day's sets all stay)
        deployment.env.update(REPOSITORY_KEEP_WITHIN="", REPOSITORY_KEEP_WITHIN_HOURLY="")
    staging.backup()
    production.backup()
    production.backup()  # two of production's today: its retention keeps one a day, of its own
    assert len(sets_of(restic_bin, repository, server_id(staging.server))) == 1, "staging's set of the day stays"
    assert len(sets_of(restic_bin, repository, server_id(production.server))) == 1

    status = production.run("status", "--json")
    facts = json.loads(status.stdout)
    assert facts["repository"]["sets"] == 1 and facts["repository"]["server"] == server_id(production.server)
    staging_status = json.loads(staging.run("status", "--json").stdout)
    assert staging_status["repository"]["sets"] == 1
    assert staging_status["repository"]["timestamp"] < facts["repository"]["timestamp"]


def test_a_new_server_is_told_whose_sets_there_are_and_restores_their_latest_or_one_by_id(shared, restic_bin, tmp_path):
    production, staging, repository = shared
    production.backup()
    rows = production.digests()
    rebuilt_pg = staging.server  # a rebuilt server: another cluster, which never made a set of its own
    with rebuilt_pg.connect(autocommit=True) as admin:
        tma_cloud.drop_database(admin, SHARED_NAME)
        tma_cloud.create_database(admin, SHARED_NAME)
    rebuilt = base_env(rebuilt_pg, tmp_path / "rebuilt-backups", DB_NAME=SHARED_NAME, **repository.settings)
    refused = run_cli(["restore", "--from-repository", "latest", "--confirm", SHARED_NAME], rebuilt, tmp_path)
    assert refused.returncode == 1, refused.output
    [line] = error_lines(refused.stderr)
    assert f"--server {server_id(production.server)}" in line and "set's id" in line, line
    assert "Traceback" not in refused.output

    named = run_cli(["restore", "--from-repository", "latest", "--server", server_id(production.server),
                     "--confirm", SHARED_NAME], rebuilt, tmp_path)
    assert named.returncode == 0, named.output
    assert digests(rebuilt_pg, SHARED_NAME) == rows
    with rebuilt_pg.connect(SHARED_NAME, autocommit=True) as connection:
        connection.execute("DELETE FROM audit_log")
    [one] = sets_of(restic_bin, repository, server_id(production.server))
    by_id = run_cli(["restore", "--from-repository", one["short_id"], "--confirm", SHARED_NAME], rebuilt, tmp_path)
    assert by_id.returncode == 0, by_id.output
    assert digests(rebuilt_pg, SHARED_NAME) == rows


def test_sets_made_before_sets_named_their_server_stay_usable(shared, restic_bin, tmp_path):
    """A set without a `server:` tag (made by an earlier version): `latest` takes it while this server
    has none of its own, retention never forgets it, listing shows it."""
    production, _, repository = shared
    production.env.update(REPOSITORY_KEEP_WITHIN="", REPOSITORY_KEEP_WITHIN_HOURLY="")  # count rules: a set a day
    production.backup()
    rows = production.digests()
    [made] = sets_of(restic_bin, repository, server_id(production.server))
    untagged = restic(restic_bin, repository, "tag", "--remove", f"server:{server_id(production.server)}", made["id"])
    assert untagged.returncode == 0, untagged.stderr
    with production.server.connect(SHARED_NAME, autocommit=True) as connection:
        connection.execute("DELETE FROM audit_log WHERE id > 10")
    restored = production.run("restore", "--from-repository", "latest", "--confirm", SHARED_NAME)
    assert restored.returncode == 0, restored.output
    assert production.digests() == rows
    production.backup()
    production.backup()  # retention of today's own sets: the untagged one is never forgotten
    legacy = [item for item in snapshots(restic_bin, repository) if tag_value(item, "server:") is None]
    assert len(legacy) == 1, [item["tags"] for item in snapshots(restic_bin, repository)]
    listed = [json.loads(line) for line in production.run("repository", "list", "--json").stdout.splitlines()]
    assert sorted(str(item["server"]) for item in listed) == ["None", server_id(production.server)]
