"""The off-site layer: sets in a restic repository (BACKUP_REPOSITORY).

`restic` runs restic (secrets in its environment, failures as one line, a watchdog for a dead server);
`sets` names and finds our snapshots by their tags; `lock` keeps one user at a time; `offsite` is the
chain's link (send what the repository lacks, confirm, forget per the calendar policy); `fetch` brings a
set back into BACKUP_DIR for a restore or drill; `maintenance` is init, prune and check.
"""
