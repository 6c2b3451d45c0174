"""Settings: read once from the environment, then `.env` in the working directory, and validated.

The environment wins over `.env` (the seed script got this backwards). Every bad value becomes one
`SettingsError` line naming the variable; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The checks of paths and names, and the backup folder's, live in `worker.setting_checks`; re-exported here
# (`from worker.settings import check_database_name, ensure_backup_dir, …` is how every caller imports them).
from worker.setting_checks import (
    SettingsError,
    absolute_path,
    check_database_name,
    ensure_backup_dir,
    folder_warning,
    readable_cert_store,
    readable_file,
    repository_address,
)

__all__ = ["DEFAULT_BROKER_URL", "SECRET_SETTINGS", "SIGNING_SETTINGS", "Settings", "SettingsError", "SslMode",
           "check_database_name", "ensure_backup_dir", "folder_warning", "get_settings"]

# libpq's six `sslmode` values; unset means libpq's own default, `prefer`.
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

# restic's durations (`forget --keep-within 90d`): years, months, days, hours.
DURATION = r"^([0-9]+[ymdh])+$"
DURATION_OR_NONE = r"^(([0-9]+[ymdh])+)?$"

# Signed task messages: the three paths, all set or none.
SIGNING_SETTINGS = ("TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE")


# Never echoed back in an error line, a log or a result.
SECRET_SETTINGS = frozenset({
    "DB_PASSWORD", "BACKUP_REPOSITORY_PASSWORD", "BACKUP_REPOSITORY_ACCESS_KEY_ID",
    "BACKUP_REPOSITORY_SECRET_ACCESS_KEY", "VAULT_REPOSITORY_PASSWORD", "VAULT_REPOSITORY_ACCESS_KEY_ID",
    "VAULT_REPOSITORY_SECRET_ACCESS_KEY", "FILE_ENCRYPTION_KEY", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY",
    "RUSTFS_ACCESS_KEY", "RUSTFS_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "NOTIFY_URLS",
    "HEALTHCHECK_URL",
})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=True
    )

    # The seed script's names and defaults.
    DB_HOST: str = "localhost"
    DB_PORT: int = Field(default=5432, ge=1, le=65535)
    DB_USER: str = "postgres"
    DB_PASSWORD: SecretStr | None = None
    DB_NAME: str = "tma_cloud_storage"
    DB_CONTAINER: str | None = None
    BACKUP_RETAIN_COUNT: int = Field(default=10, ge=1)

    # Ours.
    DB_MODE: Literal["auto", "host", "docker"] = "auto"
    BACKUP_DIR: Path = Path("backups")
    BACKUP_SCHEDULE: str = "0 2 * * *"
    BACKUP_DRILL_SCHEDULE: str = "0 4 * * 0"
    BACKUP_COMPRESSION: str = "6"
    BACKUP_MAX_AGE_HOURS: float = Field(default=26, gt=0)
    # A scheduled run skips the set when nothing changed since the last one (`worker.backup.unchanged`);
    # tables that change on their own (TMA Cloud's job queue, its clients' heartbeats) do not count.
    BACKUP_SKIP_UNCHANGED: bool = True
    BACKUP_UNCHANGED_IGNORE: str = "pgboss.*,public.client_heartbeats"
    # The loss window status allows: the age of the newest state safely off site ("45m", "26h"; "" derives
    # it from BACKUP_SCHEDULE: its longest gap and a quarter of it, at least 10 minutes).
    MAX_RPO: str = Field(default="", pattern=r"^([0-9]+[mhd])?$")
    BACKUP_LOCK_TIMEOUT: int = Field(default=9, ge=5, le=3600)  # the lock's lease: a killed run frees it within this
    BACKUP_RETRIES: int = Field(default=2, ge=0, le=10)
    PG_LOCK_WAIT_TIMEOUT: str = Field(default="60s", pattern=r"^[0-9]+(ms|s|min|h)?$")
    CELERY_BROKER_URL: str | None = None
    CELERY_RESULT_BACKEND: str | None = None
    WORKER_HOST: str = Field(default_factory=socket.gethostname, min_length=1)
    RESTORE_TOKEN_TTL: int = Field(default=600, ge=1, le=86400)
    RESTORE_JOBS: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)
    RESTORE_KEEP_PREVIOUS: int = Field(default=1, ge=0)
    FOLLOW_TIMEOUT: int = Field(default=6 * 3600, ge=10)
    # TMA Cloud's own names: libpq's sslmode and sslrootcert, for psycopg and the client tools alike.
    DB_SSLMODE: SslMode = "prefer"
    DB_SSLROOTCERT: Path | None = None
    # Signed task messages (Celery's `auth` serializer, `worker.coordination.signing`): the private key that
    # signs what this process sends, its certificate, and the folder of certificates whose messages a
    # worker accepts. All three or none; `tma-backup keys init` makes them.
    TASK_SIGNING_KEY: Path | None = None
    TASK_SIGNING_CERT: Path | None = None
    TASK_SIGNING_CERT_STORE: Path | None = None
    # The off-site restic repository (`worker.repository`): any address restic accepts, a local folder made
    # absolute against the working folder when the settings are read. Unset: local only.
    BACKUP_REPOSITORY: str | None = None
    BACKUP_REPOSITORY_PASSWORD: SecretStr | None = None
    BACKUP_REPOSITORY_PASSWORD_FILE: Path | None = None
    # Ours, not AWS_*: TMA Cloud's .env already uses AWS_ACCESS_KEY_ID for its own bucket.
    BACKUP_REPOSITORY_ACCESS_KEY_ID: SecretStr | None = None
    BACKUP_REPOSITORY_SECRET_ACCESS_KEY: SecretStr | None = None
    # Calendar retention in the repository, per database, with restic's semantics (`forget --keep-*`).
    # Time-based first (restic's `--keep-within*`, counted back from a group's newest set): a day of sets at
    # full resolution, then the newest of each hour for two days; then the counts. "" for none.
    REPOSITORY_KEEP_WITHIN: str = Field(default="1d", pattern=DURATION_OR_NONE)
    REPOSITORY_KEEP_WITHIN_HOURLY: str = Field(default="2d", pattern=DURATION_OR_NONE)
    REPOSITORY_KEEP_WITHIN_DAILY: str = Field(default="", pattern=DURATION_OR_NONE)
    REPOSITORY_KEEP_HOURLY: int = Field(default=0, ge=0, le=100000)
    REPOSITORY_KEEP_DAILY: int = Field(default=7, ge=0, le=100000)
    REPOSITORY_KEEP_WEEKLY: int = Field(default=4, ge=0, le=100000)
    REPOSITORY_KEEP_MONTHLY: int = Field(default=12, ge=0, le=100000)
    REPOSITORY_KEEP_YEARLY: int = Field(default=0, ge=0, le=100000)
    # Weekly in beat: `restic prune` (the forget runs with every backup) and a check reading a subset.
    REPOSITORY_MAINTENANCE_SCHEDULE: str = "30 5 * * 0"
    REPOSITORY_CHECK_SUBSET: str = Field(default="2%", pattern=r"^(100|[1-9][0-9]?)(\.[0-9]+)?%$")
    # restic retries a vanished server for many minutes: after this long with nothing but retries, stop.
    REPOSITORY_STALL_TIMEOUT: int = Field(default=300, ge=5, le=86400)
    # How long a run waits for the repository while another run, a restore or the prune uses it.
    REPOSITORY_LOCK_WAIT: int = Field(default=3600, ge=0, le=86400)
    BACKUP_DRILL_FROM_REPOSITORY: bool = False
    # A vault (`worker.vault`): on another machine, a repository of its own that pulls the primary's sets
    # (BACKUP_REPOSITORY, read only) and keeps them by time, whatever the primary's host does.
    VAULT_REPOSITORY: str | None = None
    VAULT_REPOSITORY_PASSWORD: SecretStr | None = None
    VAULT_REPOSITORY_PASSWORD_FILE: Path | None = None
    VAULT_REPOSITORY_ACCESS_KEY_ID: SecretStr | None = None
    VAULT_REPOSITORY_SECRET_ACCESS_KEY: SecretStr | None = None
    VAULT_SCHEDULE: str = "0 * * * *"
    VAULT_MAINTENANCE_SCHEDULE: str = "45 5 * * 0"
    # restic's time-based rules (`forget --keep-within*`, durations such as 90d, 1y6m): every set of the
    # last VAULT_KEEP_WITHIN, then the newest of each day, week, month within the others ("" for none).
    VAULT_KEEP_WITHIN: str = Field(default="90d", pattern=DURATION)
    VAULT_KEEP_WITHIN_DAILY: str = Field(default="180d", pattern=DURATION_OR_NONE)
    VAULT_KEEP_WITHIN_WEEKLY: str = Field(default="1y", pattern=DURATION_OR_NONE)
    VAULT_KEEP_WITHIN_MONTHLY: str = Field(default="5y", pattern=DURATION_OR_NONE)

    # TMA Cloud's uploads and configuration (the whole set; `worker.uploads`), with TMA's own names.
    STORAGE_DRIVER: Literal["local", "s3"] = "local"
    UPLOAD_DIR: Path | None = None
    FILE_ENCRYPTION_KEY: SecretStr | None = None
    # The settings file that goes into each set (the `.env` these settings were read from by default).
    TMA_ENV_FILE: Path | None = None
    # The uploads the database references: one text column (the path, relative to UPLOAD_DIR or the
    # object key), optionally a second with the plain size TMA records. Not the rows in the trash for over
    # 15 days: TMA purges those (the blob, then the row), so a backup may see the row and miss its blob.
    UPLOADS_REFERENCES_QUERY: str = ("SELECT path, size FROM files WHERE type = 'file' AND path IS NOT NULL"
                                     " AND (deleted_at IS NULL OR deleted_at > now() - interval '15 days')")
    # TMA's S3 settings and precedence (backend/config/storage.js): R2_*, then RUSTFS_*, then AWS_S3_*/AWS_*.
    R2_ACCOUNT_ID: str | None = None
    R2_ENDPOINT: str | None = None
    R2_BUCKET: str | None = None
    R2_ACCESS_KEY_ID: SecretStr | None = None
    R2_SECRET_ACCESS_KEY: SecretStr | None = None
    RUSTFS_ENDPOINT: str | None = None
    RUSTFS_BUCKET: str | None = None
    RUSTFS_ACCESS_KEY: SecretStr | None = None
    RUSTFS_SECRET_KEY: SecretStr | None = None
    RUSTFS_REGION: str | None = None
    RUSTFS_FORCE_PATH_STYLE: str | None = None
    AWS_S3_ENDPOINT: str | None = None
    AWS_S3_BUCKET: str | None = None
    AWS_ACCESS_KEY_ID: SecretStr | None = None
    AWS_SECRET_ACCESS_KEY: SecretStr | None = None
    AWS_REGION: str | None = None

    # Telling people (`worker.notify`): Apprise URLs, when to send, the dead-man's-switch ping.
    NOTIFY_URLS: SecretStr | None = None  # URLs carry tokens: never shown
    NOTIFY_ON: Literal["failure", "all"] = "failure"
    HEALTHCHECK_URL: SecretStr | None = None
    NOTIFY_TIMEOUT: float = Field(default=10, gt=0, le=120)  # the most a notification may delay a run

    @field_validator("DB_HOST")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not value.strip() or not value.isprintable() or any(char.isspace() for char in value):
            raise ValueError("must be a host name, an address or a socket folder, without spaces or control characters")
        return value

    @field_validator("DB_NAME")
    @classmethod
    def _name_fits_a_file_name(cls, value: str) -> str:
        check_database_name(value)
        return value

    @field_validator("BACKUP_DIR")
    @classmethod
    def _usable_path(cls, value: Path) -> Path:
        try:
            value.expanduser()
        except RuntimeError:  # `~user/...` for a user this machine does not know
            raise ValueError("names the home folder of an unknown user") from None
        if "\0" in str(value):
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("DB_SSLMODE", mode="before")
    @classmethod
    def _empty_means_prefer(cls, value: object) -> object:
        return "prefer" if isinstance(value, str) and not value.strip() else value

    @field_validator("DB_SSLROOTCERT")
    @classmethod
    def _readable_ca_file(cls, value: Path | None) -> Path | None:
        return None if value is None else readable_file(value, "a readable CA certificate file")

    @field_validator("DB_CONTAINER", "DB_SSLROOTCERT", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
                     "TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE", "BACKUP_REPOSITORY",
                     "BACKUP_REPOSITORY_PASSWORD", "BACKUP_REPOSITORY_PASSWORD_FILE",
                     "BACKUP_REPOSITORY_ACCESS_KEY_ID", "BACKUP_REPOSITORY_SECRET_ACCESS_KEY", "UPLOAD_DIR",
                     "VAULT_REPOSITORY", "VAULT_REPOSITORY_PASSWORD", "VAULT_REPOSITORY_PASSWORD_FILE",
                     "VAULT_REPOSITORY_ACCESS_KEY_ID", "VAULT_REPOSITORY_SECRET_ACCESS_KEY",
                     "FILE_ENCRYPTION_KEY", "TMA_ENV_FILE", "R2_ACCOUNT_ID", "R2_ENDPOINT", "R2_BUCKET",
                     "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "RUSTFS_ENDPOINT", "RUSTFS_BUCKET", "RUSTFS_ACCESS_KEY",
                     "RUSTFS_SECRET_KEY", "RUSTFS_REGION", "RUSTFS_FORCE_PATH_STYLE", "AWS_S3_ENDPOINT", "AWS_S3_BUCKET",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "NOTIFY_URLS", "HEALTHCHECK_URL",
                     mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("TASK_SIGNING_KEY", "TASK_SIGNING_CERT")
    @classmethod
    def _readable_signing_file(cls, value: Path | None) -> Path | None:
        return None if value is None else readable_file(value, "a readable PEM file")

    @field_validator("BACKUP_REPOSITORY_PASSWORD_FILE", "VAULT_REPOSITORY_PASSWORD_FILE")
    @classmethod
    def _readable_password_file(cls, value: Path | None) -> Path | None:
        return None if value is None else readable_file(value, "a readable file holding the repository's password")

    @field_validator("BACKUP_REPOSITORY", "VAULT_REPOSITORY")
    @classmethod
    def _repository_address(cls, value: str | None) -> str | None:
        # a local folder made absolute once, here: restic also runs in other folders (inside UPLOAD_DIR)
        return None if value is None else repository_address(value)

    @model_validator(mode="after")
    def _repository_complete(self) -> Settings:
        if self.BACKUP_REPOSITORY is None:
            return self
        from worker.repository.access import primary_access
        from worker.repository.maintenance import keep_arguments

        primary_access(self).check()
        if not keep_arguments(self):
            raise ValueError("REPOSITORY_KEEP_*: at least one rule must keep something (else every set would be "
                             "forgotten)")
        return self

    @model_validator(mode="after")
    def _vault_complete(self) -> Settings:
        from worker.vault.config import check_vault

        check_vault(self)  # ValueError naming what is wrong (and a vault on a host that backs up a database)
        return self

    @field_validator("NOTIFY_URLS")
    @classmethod
    def _notify_urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        from worker.notify.urls import check_notify_urls

        check_notify_urls(value.get_secret_value())  # ValueError naming what is wrong, never the URL's secrets
        return value

    @field_validator("HEALTHCHECK_URL")
    @classmethod
    def _healthcheck_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        from worker.notify.urls import check_healthcheck_url

        check_healthcheck_url(value.get_secret_value())
        return value

    @field_validator("UPLOAD_DIR", "TMA_ENV_FILE")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        return None if value is None else absolute_path(value)

    @field_validator("TASK_SIGNING_CERT_STORE")
    @classmethod
    def _readable_cert_store(cls, value: Path | None) -> Path | None:
        return None if value is None else readable_cert_store(value)

    @model_validator(mode="after")
    def _signing_all_or_none(self) -> Settings:
        given = {name: getattr(self, name) for name in SIGNING_SETTINGS}
        missing = [name for name, value in given.items() if value is None]
        if missing and len(missing) < len(SIGNING_SETTINGS):
            raise ValueError(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: signed task messages "
                f"need {', '.join(SIGNING_SETTINGS[:-1])} and {SIGNING_SETTINGS[-1]} together (or none of them)"
            )
        return self

    @field_validator("BACKUP_COMPRESSION")
    @classmethod
    def _known_compression(cls, value: str) -> str:
        from worker.archive.compression import parse_compression

        parse_compression(value)
        return value

    @field_validator("BACKUP_SCHEDULE", "BACKUP_DRILL_SCHEDULE", "REPOSITORY_MAINTENANCE_SCHEDULE", "VAULT_SCHEDULE",
                     "VAULT_MAINTENANCE_SCHEDULE")
    @classmethod
    def _cron(cls, value: str) -> str:
        from worker.coordination.cron import parse_cron

        parse_cron(value)
        return value

    @property
    def broker_url(self) -> str | None:
        return self.CELERY_BROKER_URL

    @property
    def configured_server(self) -> str:
        """The database server as configured (not its identity: see `worker.pg.identity`)."""
        return f"container:{self.DB_CONTAINER}" if self.DB_CONTAINER else f"{self.DB_HOST}:{self.DB_PORT}"

    @property
    def local_redis_url(self) -> str:
        """The Redis a worker without CELERY_BROKER_URL uses as its broker, and where in-process runs
        take their database locks too (when it answers)."""
        return self.CELERY_BROKER_URL or DEFAULT_BROKER_URL

    @property
    def result_backend(self) -> str | None:
        return self.CELERY_RESULT_BACKEND or self.CELERY_BROKER_URL

    @property
    def backup_dir(self) -> Path:
        return self.BACKUP_DIR.expanduser().absolute()

    @property
    def password(self) -> str | None:
        return self.DB_PASSWORD.get_secret_value() if self.DB_PASSWORD else None

    @property
    def repository(self) -> str | None:
        """The restic repository's address (BACKUP_REPOSITORY; a local folder absolute, whatever folder
        restic runs in), or None: backups stay local."""
        return self.BACKUP_REPOSITORY

    @property
    def unchanged_ignore(self) -> list[str]:
        return [pattern.strip() for pattern in self.BACKUP_UNCHANGED_IGNORE.split(",") if pattern.strip()]

    @property
    def vault(self) -> str | None:
        """The vault's own repository (VAULT_REPOSITORY): set, this host is a vault and backs nothing up."""
        return self.VAULT_REPOSITORY

    @property
    def env_file(self) -> Path:
        """The settings file these settings were read from (TMA_ENV_FILE, else `.env` here)."""
        return self.TMA_ENV_FILE or Path(".env").absolute()

    @property
    def signing(self) -> bool:
        """Task messages are signed and only signed ones accepted (the three TASK_SIGNING_* are set)."""
        return self.TASK_SIGNING_KEY is not None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    variable = ".".join(str(part) for part in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    secret = variable in SECRET_SETTINGS or variable == "BACKUP_REPOSITORY"  # an address may carry user:password@
    shown = "" if secret or isinstance(given, dict) else f" (got {given!r})"
    return f"{variable}: {message}{shown}"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The validated settings, read once per process."""
    env_file = os.environ.get("TMA_ENV_FILE", "").strip() or ".env"
    try:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]  # pydantic-settings' init keyword
    except OSError as error:  # the settings file exists but cannot be read (permissions, a folder)
        which = "TMA_ENV_FILE" if os.environ.get("TMA_ENV_FILE", "").strip() else ".env"
        raise SettingsError(f"{which}: {Path(env_file).absolute()} cannot be read ({error.strerror})") from None
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None
