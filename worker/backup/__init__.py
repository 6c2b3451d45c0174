"""The backup chain as plain functions: start → dump → verify → checksum → meta →
offsite (with BACKUP_REPOSITORY) → prune.

`tasks/backup.py` wraps each link in a Celery task; `inprocess.run_backup` runs them in sequence for
set-ups without a broker. The run record that links hand on is `run.Run`.
"""

from worker.backup.dump import dump
from worker.backup.run import Run, Summary, abandon_files, check_run, start_run, summary
from worker.backup.steps import checksum, offsite, prune, verify, write_meta

__all__ = ["Run", "Summary", "abandon_files", "check_run", "checksum", "dump", "offsite", "prune", "start_run",
           "summary", "verify", "write_meta"]
