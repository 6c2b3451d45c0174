"""What opens a repository: its address, its password (or password file) and, for S3, its key pair,
with the prefix of the settings that name them (BACKUP_REPOSITORY: the primary; VAULT_REPOSITORY: a
vault's own) for the lines that say which one failed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:
    from worker.settings import Settings


@dataclass(frozen=True)
class Access:
    """One repository and what opens it; `names` is the settings' prefix, for error lines."""

    address: str
    password: SecretStr | None
    password_file: Path | None
    key_id: SecretStr | None
    secret: SecretStr | None
    names: str

    def check(self) -> None:
        """ValueError (one line naming the settings) when what opens it is incomplete."""
        if (self.password is None) == (self.password_file is None):
            raise ValueError(f"{self.names} needs its password: set {self.names}_PASSWORD or {self.names}_PASSWORD_FILE "
                             "(one of them, not both)")
        if (self.key_id is None) != (self.secret is None):
            raise ValueError(f"{self.names}_ACCESS_KEY_ID and {self.names}_SECRET_ACCESS_KEY go together")
        if self.address.startswith("s3:") and self.key_id is None:
            raise ValueError(f"{self.names} is an S3 bucket: set {self.names}_ACCESS_KEY_ID and "
                             f"{self.names}_SECRET_ACCESS_KEY")

    @property
    def keys(self) -> tuple[str, str] | None:
        if self.key_id is None or self.secret is None:
            return None
        return self.key_id.get_secret_value(), self.secret.get_secret_value()


def primary_access(settings: Settings) -> Access:
    return Access(settings.BACKUP_REPOSITORY or "", settings.BACKUP_REPOSITORY_PASSWORD,
                  settings.BACKUP_REPOSITORY_PASSWORD_FILE, settings.BACKUP_REPOSITORY_ACCESS_KEY_ID,
                  settings.BACKUP_REPOSITORY_SECRET_ACCESS_KEY, "BACKUP_REPOSITORY")


def vault_access(settings: Settings) -> Access:
    return Access(settings.VAULT_REPOSITORY or "", settings.VAULT_REPOSITORY_PASSWORD,
                  settings.VAULT_REPOSITORY_PASSWORD_FILE, settings.VAULT_REPOSITORY_ACCESS_KEY_ID,
                  settings.VAULT_REPOSITORY_SECRET_ACCESS_KEY, "VAULT_REPOSITORY")
