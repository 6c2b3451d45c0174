"""Run the backup chain in this process, for set-ups without a broker: the same steps the tasks run."""

from __future__ import annotations

import uuid

from worker import backup
from worker.coordination.locks import database_lock
from worker.pg.executors import Executor
from worker.pg.identity import server_identity
from worker.progress import Progress
from worker.settings import Settings


def run_backup(settings: Settings, database: str, executor: Executor, progress: Progress) -> backup.Summary:
    run_id = f"local-{uuid.uuid4()}"
    server = server_identity(settings, executor, database)
    lock = database_lock(settings, database, run_id, server)
    run = backup.start_run(settings, database, run_id, lock, server)
    try:
        run = backup.dump(run, settings, executor, lock, progress)
        run = backup.verify(run, settings, executor, lock, progress)
        run = backup.checksum(run, settings, lock, progress)
        progress("writing meta", {})
        run = backup.write_meta(run, settings, lock)
        if settings.repository:
            run = backup.offsite(run, settings, lock, progress)
        progress("pruning", {})
        run = backup.prune(run, settings, lock, progress)
    except BaseException:
        backup.abandon_files(run)
        raise
    finally:
        lock.release()
    return backup.summary(run)
