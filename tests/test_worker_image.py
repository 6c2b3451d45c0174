"""The worker image's own PostgreSQL client tools, for real. It carries the tools of every major we support
(PG_CLIENT_MAJORS in docker/images/common.sh, chosen there once: 15, 17 and 18, the newest first on PATH
and at least TMA Cloud's 18), and the worker runs the server's own major's (worker/pg/executors/host.py).
Through the tool itself, run in the worker image in DB_MODE=host over a Docker network (as the joined
compose stack reaches TMA Cloud's tma-cloud-postgres: no Docker socket), servers 15, 17 and 18 are backed
up and each backup restored into its server in both modes (swap with `pg_restore -j 2`, then in-place with
`--single-transaction`), the content exactly the backup's.

Why several majors, checked here with the bare tools: pg_dump 18 dumps 15, 17 and 18, and pg_restore 18
restores its archives into 17 and 18, but not into 15 (it sends `SET transaction_timeout`, which 15 does
not know; and pg_restore 15 cannot read pg_dump 18's archive): PostgreSQL promises that a dump loads into
servers of the pg_dump's major or newer. An archive of a 15 server made by pg_dump 15 restores into 18 (a
TMA Cloud moved to 18 gets its older sets back). A client older than its server is refused in one line:
tests/test_docker_mode.py (the host's pg_dump 15 against 17 and 18). The host side of the choice (the
server's major's folder, else PATH) is checked here too, against this machine's PostgreSQL.

Needs: a Docker engine and the images docker/ci-setup.sh builds (tma-local/tma-backup-worker:latest and
tma-local/postgres:15, :17, :18; the fixtures are tests/docker_fixtures.py's).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import services, tma_cloud
from tests.docker_fixtures import (  # noqa: F401  (fixtures)
    TEST_LABEL,
    PgContainer,
    create_tma_database,
    docker_client,
    drop_database,
    pg15_container,
    pg17_container,
    pg18_container,
    pg_container,
    unavailable,
)
from tests.helpers import error_lines, only_backup, settings_for
from worker.pg.executors import host
from worker.pg.executors.host import HostExecutor

WORKER_IMAGE = "tma-local/tma-backup-worker:latest"
COMMON_SH = services.REPO / "docker" / "images" / "common.sh"
TMA_CLOUD_MAJOR = 18  # TMA Cloud's docker-compose.yml runs postgres:18-alpine
WORKER_UID = 1000


def pg_client_majors() -> list[int]:
    """PG_CLIENT_MAJORS, from the one line of docker/images/common.sh that chooses them."""
    found = re.findall(r'^PG_CLIENT_MAJORS="([0-9 ]+)"$', COMMON_SH.read_text(), re.MULTILINE)
    assert len(found) == 1, f"{COMMON_SH} must set PG_CLIENT_MAJORS exactly once, found {found}"
    return [int(major) for major in found[0].split()]


@dataclass
class ImageRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_in_image(client: Any, command: list[str], *, network: str = "none", environment: dict[str, str] | None = None,
                 backup_dir: Path | None = None, timeout: float = 300) -> ImageRun:
    """`command` in a throw-away container of the worker image, as its user (uid 1000). The environment
    (with the database password) goes through the Docker API, never a command line."""
    volumes = {str(backup_dir): {"bind": "/backups", "mode": "rw"}} if backup_dir else {}
    container = client.containers.run(WORKER_IMAGE, command, detach=True, network=network, labels=TEST_LABEL,
                                      environment=environment or {}, volumes=volumes, user=f"{WORKER_UID}:{WORKER_UID}")
    try:
        status = container.wait(timeout=timeout)
        return ImageRun(int(status["StatusCode"]), container.logs(stdout=True, stderr=False).decode("utf-8", "replace"),
                        container.logs(stdout=False, stderr=True).decode("utf-8", "replace"))
    finally:
        container.remove(force=True)


@pytest.fixture(scope="module")
def worker_image(docker_client: Any) -> str:
    import docker

    try:
        docker_client.images.get(WORKER_IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"{WORKER_IMAGE} is missing: run docker/ci-setup.sh (or docker/images/worker/build.sh)")
    return WORKER_IMAGE


@pytest.fixture(scope="module")
def image_network(docker_client: Any, worker_image: str) -> Iterator[str]:
    """A network of its own, where the servers answer to their container names (as tma-cloud-postgres
    does on TMA Cloud's network). Servers join it on first use; they leave it, and it goes, at the end."""
    network = docker_client.networks.create(f"tma-test-image-{uuid.uuid4().hex[:8]}", driver="bridge",
                                            labels=TEST_LABEL)
    try:
        yield network.name
    finally:
        network.reload()
        for container in network.containers:
            network.disconnect(container, force=True)
        network.remove()


def on_network(docker_client: Any, network: str, server: PgContainer) -> None:
    attached = docker_client.networks.get(network)
    attached.reload()
    if server.container.id not in {container.id for container in attached.containers}:
        attached.connect(server.container)


@pytest.mark.slow
def test_the_worker_image_carries_the_client_tools_of_every_supported_major(docker_client, worker_image):
    majors = pg_client_majors()
    newest = majors[-1]
    assert majors == sorted(majors) and newest >= TMA_CLOUD_MAJOR, \
        "oldest to newest, and the newest dumps TMA Cloud's own server without the Docker socket"
    labels = docker_client.images.get(worker_image).labels
    assert labels.get("org.tma.pg-client-major") == str(newest), labels
    assert labels.get("org.tma.pg-client-majors") == ",".join(map(str, majors)), labels
    script = ("for t in pg_dump pg_restore psql; do command -v $t; done; "
              + "".join(f"for t in pg_dump pg_restore psql; do /usr/lib/postgresql/{major}/bin/$t --version; done; "
                        for major in majors)
              + "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null; true")
    found = run_in_image(docker_client, ["sh", "-c", script])
    assert found.returncode == 0, found.output
    lines = found.stdout.splitlines()
    for tool in ("pg_dump", "pg_restore", "psql"):
        assert f"/usr/lib/postgresql/{newest}/bin/{tool}" in lines, "the newest first on PATH: " + found.stdout
        for major in majors:
            assert any(line.startswith(f"{tool} (PostgreSQL) {major}.") for line in lines), (major, found.stdout)
    # the suites the other clients came from (bookworm, sid) are not left among the image's apt sources
    assert [line.split()[2] for line in lines if line.startswith("deb ")] == ["trixie"], found.stdout


def test_host_tools_are_the_servers_own_majors_when_this_host_has_them(pg, cli_env, tmp_path, monkeypatch):
    """Against this machine's PostgreSQL: without a folder for its major, PATH's tools (as before); with
    /usr/lib/postgresql/<its major>/bin (here a stand-in folder), that folder's; a folder of another major
    only, or a server that cannot be asked, PATH's."""
    settings = settings_for(cli_env)
    with pg.connect() as connection:
        major = connection.info.server_version // 10000
    real = {tool: os.path.realpath(shutil.which(f"/usr/lib/postgresql/{major}/bin/{tool}") or shutil.which(tool) or tool)
            for tool in ("pg_dump", "pg_restore")}

    def folders(*majors: int) -> Path:
        root = tmp_path / f"clients-{'-'.join(map(str, majors)) or 'none'}"
        for each in majors:
            (root / str(each) / "bin").mkdir(parents=True)
            for tool, target in real.items():
                (root / str(each) / "bin" / tool).symlink_to(target)
        root.mkdir(exist_ok=True)
        return root

    on_path = shutil.which("pg_dump")
    monkeypatch.setattr(host, "CLIENT_FOLDERS", folders())
    assert HostExecutor(settings).describe().startswith(f"host tools ({on_path}) against"), "PATH's, as before"
    monkeypatch.setattr(host, "CLIENT_FOLDERS", folders(major + 1))
    assert HostExecutor(settings).describe().startswith(f"host tools ({on_path}) against")
    clients = folders(major - 1, major, major + 1)
    monkeypatch.setattr(host, "CLIENT_FOLDERS", clients)
    executor = HostExecutor(settings)
    assert executor.describe().startswith(f"host tools ({clients / str(major) / 'bin' / 'pg_dump'}) against")
    assert executor.tool_major("pg_dump") == executor.tool_major("pg_restore") == major
    unreachable = settings_for({**cli_env, "DB_PORT": "1"})
    assert HostExecutor(unreachable).describe().startswith(f"host tools ({on_path}) against")


@pytest.fixture
def served_database(pg_container: PgContainer) -> Iterator[tuple[PgContainer, str]]:
    name = create_tma_database(pg_container)
    try:
        yield pg_container, name
    finally:
        with pg_container.connect(autocommit=True) as admin:
            kept = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{name}__%",)).fetchall()
            for (copy,) in kept:
                tma_cloud.drop_database(admin, copy)
        drop_database(pg_container, name)


@pytest.mark.slow
def test_the_image_backs_up_and_restores_postgresql_15_17_and_18_with_each_servers_own_tools(
        docker_client, image_network, served_database, tmp_path):
    server, database = served_database
    assert server.major in pg_client_majors(), "every server the tests run is one the image supports"
    on_network(docker_client, image_network, server)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir(mode=0o700)
    os.chown(backup_dir, WORKER_UID, WORKER_UID)
    environment = {"DB_HOST": server.name, "DB_PORT": "5432", "DB_USER": server.user, "DB_PASSWORD": server.password,
                   "DB_NAME": database, "DB_MODE": "host", "DB_SSLMODE": "disable", "BACKUP_DIR": "/backups",
                   "RESTORE_JOBS": "2"}

    def tma_backup(*args: str) -> ImageRun:
        return run_in_image(docker_client, ["tma-backup", *args], network=image_network, environment=environment,
                            backup_dir=backup_dir)

    backup = tma_backup("backup")
    assert backup.returncode == 0, backup.output
    tools = f"/usr/lib/postgresql/{server.major}/bin"
    assert f"host tools ({tools}/pg_dump) against {server.name}:5432; DB_MODE=host" in backup.stderr, backup.stderr
    assert server.password not in backup.output
    dump, meta = only_backup(backup_dir, database)
    assert meta.mode == "host"
    assert meta.extra["pg_dump_version"] == str(server.major), "the server's own major's pg_dump did the dump"
    assert meta.extra["server_version"].startswith(f"{server.major}."), meta.extra
    with server.connect(database) as connection:
        assert meta.row_counts == tma_cloud.exact_counts(connection)
        at_backup = tma_cloud.table_digests(connection)

    verified = tma_backup("verify", f"/backups/{dump.name}")
    assert verified.returncode == 0, verified.output
    assert f"TOC entries: {meta.toc_entries} (matches .meta)" in verified.stderr

    for mode in ("swap", "in-place"):
        with server.connect(database, autocommit=True) as connection:
            connection.execute("INSERT INTO users (email, name) VALUES ('late@example.com', 'After the backup')")
            connection.execute("DELETE FROM share_links")
        restored = tma_backup("restore", f"/backups/{dump.name}", "--confirm", database, "--mode", mode)
        assert restored.returncode == 0, f"{mode}: {restored.output}"
        assert "── Restore Complete ──" in restored.stderr and not error_lines(restored.stderr), restored.stderr
        with server.connect(database) as connection:
            assert tma_cloud.table_digests(connection) == at_backup, f"{mode}: content differs from the backup"


def bare_tools(client: Any, network: str, server: PgContainer, script: str) -> ImageRun:
    """A shell script with the image's bare tools against `server` (libpq's settings in the environment)."""
    return run_in_image(client, ["sh", "-c", f"set -u; cd /tmp; {script}"], network=network,
                        environment={"PGHOST": server.name, "PGUSER": server.user, "PGPASSWORD": server.password,
                                     "PGSSLMODE": "disable"})


@pytest.mark.slow
def test_the_newest_pg_dump_dumps_every_server_and_its_pg_restore_loads_only_into_its_own_major_and_newer(
        docker_client, image_network, served_database):
    """The newest client against older servers, bare: pg_dump 18 dumps 15, 17 and 18 and pg_restore 18
    lists every archive; it restores into 17 and 18, and into 15 it fails on `transaction_timeout` (which
    is why the worker runs a server's own major's tools, and the image carries them)."""
    server, database = served_database
    newest = f"/usr/lib/postgresql/{pg_client_majors()[-1]}/bin"
    on_network(docker_client, image_network, server)
    run = bare_tools(docker_client, image_network, server, f"""
        {newest}/pg_dump -Fc -d {database} -f a.dump || exit 10
        {newest}/pg_restore --list a.dump >/dev/null || exit 11
        {newest}/psql -X -q -d postgres -c 'CREATE DATABASE {database}_copy' || exit 12
        {newest}/pg_restore --exit-on-error -j 2 -d {database}_copy a.dump; restored=$?
        {newest}/psql -X -q -d postgres -c 'DROP DATABASE {database}_copy' || exit 13
        exit $restored""")
    if server.major >= 17:
        assert run.returncode == 0, run.output
    else:
        assert run.returncode == 1 and 'unrecognized configuration parameter "transaction_timeout"' in run.stderr, \
            run.output


@pytest.mark.slow
def test_a_backup_of_a_15_server_by_its_own_tools_restores_into_18(
        docker_client, image_network, pg15_container, pg18_container):
    """TMA Cloud moved from 15 to 18: a set made by pg_dump 15 restores into the new server (pg_restore 18)."""
    database = create_tma_database(pg15_container)
    try:
        for server in (pg15_container, pg18_container):
            on_network(docker_client, image_network, server)
        script = (f"/usr/lib/postgresql/15/bin/pg_dump -Fc -d {database} -f a.dump || exit 10; "
                  f"PGHOST={pg18_container.name} psql -X -q -d postgres -c 'CREATE DATABASE {database}' || exit 11; "
                  f"PGHOST={pg18_container.name} pg_restore --exit-on-error -j 2 -d {database} a.dump")
        run = bare_tools(docker_client, image_network, pg15_container, script)
        assert run.returncode == 0, run.output
        with pg15_container.connect(database) as old, pg18_container.connect(database) as new:
            assert tma_cloud.table_digests(new) == tma_cloud.table_digests(old)
    finally:
        drop_database(pg15_container, database)
        drop_database(pg18_container, database)
