"""The chain's links, one import for the callers that run them (`tasks/backup.py`, `inprocess`)."""

from worker.backup.dump import dump
from worker.backup.run import Run, Summary, abandon_files, check_run, start_run, summary
from worker.backup.steps import checksum, offsite, prune, verify, write_meta

__all__ = ["Run", "Summary", "abandon_files", "check_run", "checksum", "dump", "offsite", "prune", "start_run",
           "summary", "verify", "write_meta"]
