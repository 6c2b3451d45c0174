"""Pick where the tools run, in the seed's order, and say why.

DB_MODE=host: host tools. Otherwise the database's container, chosen through the Docker SDK:
1. `DB_CONTAINER` (name or id), which must exist and be running;
2. else `tma-cloud-postgres` (TMA Cloud's compose name), which must be running if it exists;
3. else the one running container whose image is postgres (its image name or a tag contains "postgres").
Several such containers and no `DB_CONTAINER` is an error naming them: a restore into the wrong database
is the worst outcome, so this never guesses. No container at all: host tools in DB_MODE=auto, an error
in DB_MODE=docker. A Docker engine that does not answer: host tools in DB_MODE=auto (saying why), an
error when docker mode was asked for (DB_MODE=docker or DB_CONTAINER set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import BackupError
from worker.pg.executors.base import Executor
from worker.pg.executors.host import HostExecutor
from worker.settings import Settings

PROJECT_CONTAINER = "tma-cloud-postgres"
DOCKER_TIMEOUT = 120  # seconds for one Docker API call (streams never time out)


class EngineUnreachable(Exception):
    """The Docker engine does not answer (or the docker SDK is missing)."""


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    status: str
    image: str
    tags: tuple[str, ...] = ()
    handle: Any = None  # the docker SDK's Container

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def is_postgres(self) -> bool:
        return any("postgres" in reference.lower() for reference in (self.image, *self.tags))

    def label(self) -> str:
        return f"{self.name} ({self.image})"


def pick_container(db_container: str | None, find: Callable[[str], ContainerInfo | None],
                   running: Callable[[], list[ContainerInfo]]) -> tuple[ContainerInfo | None, str]:
    """The container to use and why, or (None, why not). Raises BackupError when the choice would be a
    guess or the named container cannot be used."""
    if db_container:
        chosen = find(db_container)
        if chosen is None:
            others = [info.label() for info in running() if info.is_postgres]
            hint = f" (running PostgreSQL containers: {', '.join(others)})" if others else ""
            raise BackupError(f"DB_CONTAINER={db_container}: no such container on the Docker engine{hint}")
        if not chosen.running:
            raise BackupError(f"DB_CONTAINER={db_container}: the container exists but is not running "
                              f"(status {chosen.status}); start it or fix DB_CONTAINER")
        return chosen, f"DB_CONTAINER={db_container}"
    project = find(PROJECT_CONTAINER)
    if project is not None:
        if not project.running:
            raise BackupError(f"container {PROJECT_CONTAINER} exists but is not running (status {project.status}): "
                              "start it, or set DB_CONTAINER to the database's container, or DB_MODE=host")
        return project, f"it is TMA Cloud's container {PROJECT_CONTAINER} (DB_CONTAINER unset)"
    candidates = [info for info in running() if info.is_postgres]
    if len(candidates) > 1:
        raise BackupError(
            f"{len(candidates)} running PostgreSQL containers ({', '.join(info.label() for info in candidates)}) "
            "and DB_CONTAINER is unset: set DB_CONTAINER to the database's container (never guessed)")
    if candidates:
        return candidates[0], (f"it is the only running container with a postgres image ({candidates[0].image}); "
                               f"DB_CONTAINER unset, no {PROJECT_CONTAINER}")
    return None, f"no PostgreSQL container is running (no DB_CONTAINER, no {PROJECT_CONTAINER})"


def docker_client() -> Any:
    """A client for the engine named by the environment (DOCKER_HOST, default the local socket);
    constructing it asks the engine for its API version, so an engine that does not answer fails here."""
    try:
        from docker.errors import DockerException

        import docker
    except ImportError as error:
        raise EngineUnreachable(f"the docker SDK is not installed ({error})") from None
    try:
        return docker.DockerClient.from_env(timeout=DOCKER_TIMEOUT)
    except DockerException as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EngineUnreachable(text) from None


def _info(container: Any) -> ContainerInfo:
    attributes = container.attrs
    image = (attributes.get("Config") or {}).get("Image") or ""
    try:
        tags = tuple(container.image.tags)
    except Exception:  # the image may be gone while the container still runs
        tags = ()
    return ContainerInfo(container.name, container.status, image, tags, container)


def _finder(client: Any) -> Callable[[str], ContainerInfo | None]:
    from docker.errors import NotFound

    def find(name: str) -> ContainerInfo | None:
        try:
            return _info(client.containers.get(name))
        except NotFound:
            return None

    return find


def choose_executor(settings: Settings) -> Executor:
    if settings.DB_MODE == "host":
        return HostExecutor(settings, "DB_MODE=host")
    asked = "DB_MODE=docker" if settings.DB_MODE == "docker" else f"DB_CONTAINER={settings.DB_CONTAINER}"
    docker_asked = settings.DB_MODE == "docker" or bool(settings.DB_CONTAINER)
    try:
        client = docker_client()
    except EngineUnreachable as error:
        if docker_asked:
            raise BackupError(f"{asked} needs the Docker engine, which does not answer ({error}): "
                              "start dockerd, or set DB_MODE=host") from None
        return HostExecutor(settings, f"the Docker engine does not answer ({error}), so host tools (DB_MODE=auto)")
    from docker.errors import DockerException

    from worker.pg.executors.docker import DockerExecutor

    try:
        chosen, reason = pick_container(
            settings.DB_CONTAINER, _finder(client), lambda: [_info(c) for c in client.containers.list()])
    except DockerException as error:
        client.close()
        raise BackupError(f"cannot list containers on the Docker engine: {str(error).splitlines()[0]}") from None
    except BaseException:
        client.close()
        raise
    if chosen is None:
        client.close()
        if settings.DB_MODE == "docker":
            raise BackupError(f"DB_MODE=docker, but {reason}: set DB_CONTAINER to the database's container")
        return HostExecutor(settings, f"{reason}, so host tools (DB_MODE=auto)")
    return DockerExecutor(settings, client, chosen.handle, reason)
