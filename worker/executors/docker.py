"""Docker mode: the tools inside the database's container (placeholder until the Docker executor lands)."""

from __future__ import annotations

from worker.errors import BackupError
from worker.executors.base import Executor
from worker.settings import Settings


def choose_container_executor(settings: Settings) -> Executor:
    raise BackupError("docker mode is not available in this build; set DB_MODE=host")


def find_container_executor(settings: Settings) -> Executor | None:
    return None
