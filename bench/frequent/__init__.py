"""Issue 24's figures: what a whole set every 15 minutes costs, with the real tools. Runs on its own
(it shares nothing with bench.run):

    .venv/bin/python -m bench.frequent [--runs 3] [--uploads-mb 60] [--reference] [--compression 6|0|zstd-stream]
                                       [--work-dir DIR] [--out DIR] [--keep]

A small TMA Cloud (tests/tma_cloud.py's schema: ~4,000 rows, 300 uploads of ~60 MB in an UPLOAD_DIR,
its `.env` as TMA_ENV_FILE), or with --reference the reference set (a copy of bench.run's 1.2 GB database,
made by bench.generate once and reused, every `files` row given its upload as bench.run's section h.
gives them: ~14,000 uploads, ~1.3 GB), is backed up by the CLI in-process (no broker) into a local restic
repository, with BACKUP_SCHEDULE="*/15 * * * *", against the machine's PostgreSQL. After one first
whole set (recorded, not in the medians), each round measures `tma-backup backup --if-changed` as a
subprocess: wall seconds, CPU seconds of the CLI and every tool it runs (`os.wait4`), the CPU of the
PostgreSQL backends that serve it (sampled from /proc every 20 ms: a lower bound), and the bytes the
repository folder grew by, in these cases:

a. **unchanged**: nothing a user did since the last set. TMA Cloud idle is not silent: before the run
   pg-boss's maintenance touches its job table (IDLE below), which BACKUP_UNCHANGED_IGNORE leaves out.
   Checked: exit 0, the CLI's "Unchanged" line, no new snapshot (`restic snapshots --json` before and
   after), no new dump in BACKUP_DIR, and the check recorded (`checked_at` of BACKUP_DIR/.last-set-*.json).
b. **changed**: after "a typical 15 minutes of activity" on TMA Cloud (ACTIVITY below). Checked: a new
   set of two parts (database, uploads) and a new record.
c. **bare**: the same job done by the bare tools in the same round, on the same state: `pg_dump -Fc
   --compress=6` of the database, then `restic backup` of the dump and `restic backup` of UPLOAD_DIR
   (restic finds its parent: unchanged files are not read) into a bare repository of its own that had
   the same first set. Measured after a (what a cron job of bare tools would pay every 15 minutes) and
   after b. `pg_dump` alone is also reported.

For context, also: the CLI's start-up alone (`tma-backup --help`: what every in-process run pays before
it does anything; a worker pays it once), and one restic command (`restic snapshots --json` of the
repository, the bench's own counts: every restic command opens the repository and derives its key).

A typical 15 minutes of activity (ACTIVITY), in a few transactions as TMA Cloud would write them:
- 10 uploads of 150-250 KB (random bytes standing for AES-GCM blobs, 32 bytes over the plain size),
  each with its `files` row, and 2 uploads deleted as TMA Cloud's purge does (blob, then row);
- 50 rows updated: 20 `files` renamed (`metadata`), 15 `users` settings, 15 `sessions` touched
  (`expires_at`, `data`);
- rows inserted: 40 `audit_log`, 5 `sessions` (logins), 3 `share_links`;
- pg-boss: 30 `pgboss.job` rows inserted, 20 completed (`state`).

The rounds interleave (a, bare, activity, b, bare; the bare side goes first in every other round), so
load from elsewhere falls on both. Nothing here asserts a timing; the figures are reported beside
issue 24's goal (a 15-minute cadence costs at most 2 % of one core). A failed check is reported and
makes the exit code 1. Results: `frequent.json` and `frequent.md` in --out (default bench/results).
The database (`tma_bench_frequent`) is dropped at the end and the work folder removed unless --keep.
"""
