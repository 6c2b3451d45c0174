"""A vault's settings: what it needs (its own repository and password, the primary's address and a
password that reads it) and what it must not have (anything that backs up a database: a vault whose
secrets sit on the host it protects protects nothing). Checked once, with the other settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.repository.access import primary_access, vault_access

if TYPE_CHECKING:
    from worker.settings import Settings

# Settings that only a host backing up a database has: given together with VAULT_REPOSITORY, refused.
BACKUP_SIDE = ("DB_HOST", "DB_PASSWORD", "DB_CONTAINER", "UPLOAD_DIR", "FILE_ENCRYPTION_KEY", "TMA_ENV_FILE")


def check_vault(settings: Settings) -> None:
    """Raise ValueError (one line) when the vault's settings are incomplete or contradict each other."""
    if settings.VAULT_REPOSITORY is None:
        return
    backing_up = [name for name in BACKUP_SIDE if name in settings.model_fields_set and getattr(settings, name)]
    if backing_up:
        raise ValueError(
            f"this host is set up both to back up a database ({', '.join(backing_up)}) and as a vault "
            "(VAULT_REPOSITORY): a vault whose secrets sit on the host it protects protects nothing; run the "
            "vault on another machine, with nothing of the database's")
    vault = vault_access(settings)
    vault.check()
    if settings.BACKUP_REPOSITORY is None:
        raise ValueError("a vault pulls the primary repository's sets: set BACKUP_REPOSITORY (and its password) "
                         "to the primary's address, with a key that may only read it")
    if settings.BACKUP_REPOSITORY == settings.VAULT_REPOSITORY:
        raise ValueError("VAULT_REPOSITORY is BACKUP_REPOSITORY: the vault must be a repository of its own")
    primary = primary_access(settings)
    if primary.keys is not None and vault.keys is not None and primary.keys != vault.keys:
        raise ValueError(
            "BACKUP_REPOSITORY and VAULT_REPOSITORY are both S3 buckets with different keys: restic (0.14) gives "
            "one `restic copy` one S3 key pair; give the vault one key that reads the primary's bucket and "
            "writes its own, or keep the vault on this machine's disk (VAULT_REPOSITORY=/srv/vault)")
