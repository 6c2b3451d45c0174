"""Fixtures over a real Docker engine: throw-away PostgreSQL 15, 17 and 18 containers from locally built
images (18 is the major TMA Cloud runs: its compose uses postgres:18-alpine).

How they start:
- The engine must answer on DOCKER_HOST (default: the local socket). `docker/images/postgres/build.sh 15`
  starts dockerd when it is not running (and builds the image). With CI=true an engine that does not
  answer fails the tests that need it; locally they skip, saying so.
- Images `tma-local/postgres:15`, `:17` and `:18` are built by `docker/images/postgres/build.sh MAJOR` only
  when missing (a few minutes each, no registry needed; CI runs the build scripts before the tests). With
  CI=true a missing image whose build fails fails the test; locally it skips.
- Containers get unique names (`tma-test-pg<major>-<hex>`), a label `org.tma.test=docker-mode`, their
  5432 published on 127.0.0.1 only, at a port the engine picks (never 5432 or 6379), and are removed
  (with their volume) at the end of the session.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import services, tma_cloud
from tests.conftest import IN_CI, base_env

BUILD_SCRIPT = services.REPO / "docker" / "images" / "postgres" / "build.sh"
CONTAINER_PASSWORD = "Docker-Test-Pw-7c41e0"
TEST_LABEL = {"org.tma.test": "docker-mode"}
RESERVED_PORTS = {5432, 6379}


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Docker needed by this test is unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def image_name(major: int) -> str:
    return f"tma-local/postgres:{major}"


@dataclass
class PgContainer:
    """A PostgreSQL server in a container, reached from the host at 127.0.0.1:port."""

    name: str
    major: int
    port: int
    container: Any = field(repr=False)
    host: str = "127.0.0.1"
    user: str = "postgres"
    password: str = CONTAINER_PASSWORD

    def connect(self, dbname: str = "postgres", **options: Any) -> psycopg.Connection[Any]:
        options.setdefault("connect_timeout", 5)
        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=dbname, **options)

    def env(self, backup_dir: Path, **overrides: str) -> dict[str, str]:
        """The CLI's environment for docker mode against this container (explicit DB_CONTAINER)."""
        settings = {"DB_USER": self.user, "DB_PASSWORD": self.password, "DB_MODE": "docker",
                    "DB_CONTAINER": self.name, **overrides}
        return base_env(self, backup_dir, **settings)  # type: ignore[arg-type]  (needs .host and .port)

    def exec(self, argv: list[str]) -> tuple[int, str]:
        code, output = self.container.exec_run(argv)
        return code, output.decode("utf-8", "replace")


def engine() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as error:  # the SDK raises several types for an engine that is not there
        unavailable(f"the Docker engine does not answer ({str(error).splitlines()[0] if str(error) else error!r}): "
                    f"start it with {BUILD_SCRIPT.relative_to(services.REPO)} 15 (starts dockerd, builds the image)")
    return client


def ensure_image(client: Any, major: int) -> str:
    """The image, built with the project's build script when it is missing."""
    import docker

    name = image_name(major)
    try:
        client.images.get(name)
        return name
    except docker.errors.ImageNotFound:
        pass
    build = subprocess.run([str(BUILD_SCRIPT), str(major)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=1800)
    if build.returncode != 0:
        unavailable(f"{name} is missing and {BUILD_SCRIPT.name} {major} failed: {build.stderr.strip()[-500:]}")
    return name


def start_container(client: Any, major: int, name: str | None = None, wait: bool = True,
                    **options: Any) -> PgContainer:
    """Run a PostgreSQL container; with `wait`, return once it accepts password connections."""
    image = ensure_image(client, major)
    name = name or f"tma-test-pg{major}-{uuid.uuid4().hex[:8]}"
    container = client.containers.run(
        image, ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=100"],
        name=name, detach=True, labels=TEST_LABEL, environment={"POSTGRES_PASSWORD": CONTAINER_PASSWORD},
        ports={"5432/tcp": ("127.0.0.1", None)}, **options)
    try:
        port = _published_port(container)
        assert port not in RESERVED_PORTS, f"the engine published {name} on reserved port {port}"
        server = PgContainer(name, major, port, container)
        if wait:
            wait_ready(server)
        return server
    except BaseException:
        remove(container)
        raise


def _published_port(container: Any, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        bindings = (container.attrs["NetworkSettings"].get("Ports") or {}).get("5432/tcp") or []
        if bindings and bindings[0].get("HostPort"):
            return int(bindings[0]["HostPort"])
        time.sleep(0.1)
    raise RuntimeError(f"container {container.name} has no published port for 5432")


def wait_ready(server: PgContainer, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.container.reload()
        if server.container.status not in ("created", "running"):
            logs = server.container.logs(tail=30).decode(errors="replace")
            raise RuntimeError(f"container {server.name} stopped ({server.container.status}): {logs}")
        try:
            with server.connect(connect_timeout=1):
                return
        except psycopg.OperationalError:
            time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL in {server.name} did not accept connections within {timeout:g}s")


def remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = engine()
    yield client
    client.close()


def _session_container(client: Any, major: int) -> Iterator[PgContainer]:
    server = start_container(client, major)
    yield server
    remove(server.container)


@pytest.fixture(scope="session")
def pg15_container(docker_client: Any) -> Iterator[PgContainer]:
    yield from _session_container(docker_client, 15)


@pytest.fixture(scope="session")
def pg17_container(docker_client: Any) -> Iterator[PgContainer]:
    yield from _session_container(docker_client, 17)


@pytest.fixture(scope="session")
def pg18_container(docker_client: Any) -> Iterator[PgContainer]:
    yield from _session_container(docker_client, 18)


@pytest.fixture(params=[15, 17, 18], ids=["pg15", "pg17", "pg18"])
def pg_container(request: pytest.FixtureRequest) -> PgContainer:
    """Each test using it runs against PostgreSQL 15, 17 and 18."""
    return request.getfixturevalue(f"pg{request.param}_container")


@pytest.fixture(params=[17, 18], ids=["pg17", "pg18"])
def newer_pg_container(request: pytest.FixtureRequest) -> PgContainer:
    """Servers newer than the host's client tools (15): each test using it runs against 17 and 18."""
    return request.getfixturevalue(f"pg{request.param}_container")


def create_tma_database(server: PgContainer, name: str | None = None) -> str:
    """A database shaped like TMA Cloud's (pg_trgm, pgcrypto, pgboss schema), with data."""
    return tma_cloud.create_populated(server, name or f"tma_{uuid.uuid4().hex[:10]}")


def drop_database(server: PgContainer, name: str) -> None:
    with server.connect(autocommit=True) as admin:
        tma_cloud.drop_database(admin, name)
