"""Pick where the tools run, in the seed's order, and say why."""

from __future__ import annotations

from worker.executors.base import Executor
from worker.executors.host import HostExecutor
from worker.settings import Settings


def choose_executor(settings: Settings) -> Executor:
    if settings.DB_MODE == "host":
        return HostExecutor(settings, "DB_MODE=host")
    if settings.DB_MODE == "docker" or settings.DB_CONTAINER:
        from worker.executors.docker import choose_container_executor

        return choose_container_executor(settings)
    from worker.executors.docker import find_container_executor

    docker_executor = find_container_executor(settings)
    if docker_executor is not None:
        return docker_executor
    return HostExecutor(settings, "no PostgreSQL container found (DB_MODE=auto)")
