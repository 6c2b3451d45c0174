"""Backups as files in BACKUP_DIR: names and retention (catalogue), the `.meta` sidecar, compression,
the `.dump.zst` streams, and verification against the `.meta`."""
