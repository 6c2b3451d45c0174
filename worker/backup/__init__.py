"""The backup chain as plain functions: start → dump → verify → checksum → meta → offsite (with
BACKUP_REPOSITORY) → prune, gathered in `worker.backup.links`.

`tasks/backup.py` wraps each link in a Celery task; `inprocess.run_backup` runs them in sequence for
set-ups without a broker. The run record that links hand on is `run.Run`.

Nothing is imported here: a command that only reads a record (`status` reads `unchanged`'s) must not
pay for the chain's imports (psycopg, Redis, the executors).
"""
