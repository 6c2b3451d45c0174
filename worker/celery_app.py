"""The one Celery app. Configuration comes from `worker.celery_config`, named by string."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

app = Celery("tma_backup", include=["tasks.backup", "tasks.restore"])
app.config_from_object("worker.celery_config")

def host_queue(host: str) -> str:
    """Every worker also consumes the queue of its own host, so a chain's links run where its files are."""
    return f"tma_backup.host.{host}"


@celeryd_after_setup.connect
def _consume_own_host_queue(sender: str, instance: Any, **kwargs: Any) -> None:
    from worker.settings import get_settings

    instance.app.amqp.queues.select_add(host_queue(get_settings().WORKER_HOST))
