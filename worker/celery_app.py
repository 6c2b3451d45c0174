"""The one Celery app. Configuration comes from `worker.celery_config`, named by string.

Worker signals: every worker also consumes its own host's queue and, once it is ready, keeps the locks
of its host's chains waiting between two links (`worker.coordination.parking`); every worker repairs
what interrupted restores left on its database server (`worker.restore.repair`); and a worker on a
broker without a password beyond loopback warns at start (`worker.coordination.broker`)."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, import_modules, worker_ready

from worker import collector
from worker.coordination import broker as _broker  # noqa: F401  (registers the start-up warning)

app = Celery("tma_backup", include=["tasks.backup", "tasks.restore", "tasks.repository", "tasks.status", "tasks.vault"])
app.config_from_object("worker.celery_config")


@import_modules.connect
def _import_tasks_without_collector(sender: Celery, **kwargs: Any) -> None:
    """A worker or beat imports the task modules (most of its start-up: ~0.7 s of a core) with the collector
    off and freezes what they built (`worker.collector`); the loader then finds them imported. The pool's
    processes are forked after this, so none of them scans it either."""
    with collector.importing():
        for name in sender.loader.default_modules:
            sender.loader.import_task_module(name)


def host_queue(host: str) -> str:
    """Every worker also consumes the queue of its own host, so a chain's links run where its files are."""
    return f"tma_backup.host.{host}"


@celeryd_after_setup.connect
def _consume_own_host_queue(sender: str, instance: Any, **kwargs: Any) -> None:
    from worker.settings import get_settings

    instance.app.amqp.queues.select_add(host_queue(get_settings().WORKER_HOST))


@worker_ready.connect
def _keep_parked_locks(sender: Any = None, **kwargs: Any) -> None:
    """Chains of this host waiting between two links keep their locks (`worker.coordination.parking`)."""
    from worker.coordination.parking import start_keeper
    from worker.settings import get_settings

    start_keeper(get_settings())


@worker_ready.connect
def _repair_at_start(sender: Any = None, **kwargs: Any) -> None:
    """A crash in the middle of a swap leaves the live database refusing connections; a worker that
    starts (typically the one restarted after that crash) repairs it at once instead of at the next
    restore or drill. It runs in this process, in a thread of its own: never a task message (a fresh
    worker receives nothing), never a delay or a crash of the start-up (an unreachable server is one
    warning in the log)."""

    def run() -> None:
        try:
            from worker.restore.repair import repair_at_start
            from worker.settings import get_settings

            settings = get_settings()
            if settings.vault is not None:  # a vault has no database to repair
                return
            repair_at_start(settings, f"repair-at-start-{settings.WORKER_HOST}-{uuid.uuid4()}")
        except Exception as error:  # repair_at_start logs its own failures; this is the last resort
            logging.getLogger(__name__).warning("repair at worker start-up did not run: %s", error)

    threading.Thread(target=run, name="tma-backup-repair-at-start", daemon=True).start()
