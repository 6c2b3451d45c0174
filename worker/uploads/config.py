"""What the whole set takes from the settings: whether uploads are captured, from where, and which
configuration file goes with them. Checked when a run starts, before anything is written."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from worker.archive import catalogue
from worker.errors import BackupError
from worker.settings import Settings


def uploads_enabled(settings: Settings, database: str) -> bool:
    """Uploads (and the `.env`) go into the sets of TMA Cloud's database, DB_NAME, when there is a
    repository and TMA's storage is configured: UPLOAD_DIR for the local driver, or the S3 settings with
    STORAGE_DRIVER=s3. Another database backed up with the same settings gets a database-only set."""
    if not settings.repository or database != settings.DB_NAME:
        return False
    if settings.STORAGE_DRIVER == "s3":
        from worker.uploads.s3_settings import s3_configured

        return s3_configured(settings)
    return settings.UPLOAD_DIR is not None


def env_file(settings: Settings) -> Path | None:
    """The configuration file for the set: TMA_ENV_FILE, else the `.env` the settings were read from
    (None when there is none: settings from the environment only)."""
    if settings.TMA_ENV_FILE is not None:
        return settings.TMA_ENV_FILE
    default = settings.env_file
    return default if os.path.lexists(default) else None


def check_set_inputs(settings: Settings, database: str) -> list[str]:
    """Refuse a run whose set could not be made (one line each); warnings for what it will lack."""
    if not uploads_enabled(settings, database):
        if settings.repository and settings.STORAGE_DRIVER == "s3" and database == settings.DB_NAME:
            # TMA would refuse to start like this
            from worker.uploads.s3_settings import missing_settings_warning

            return [missing_settings_warning(settings)]
        return []
    warnings = []
    if settings.STORAGE_DRIVER == "local":
        from worker.uploads.capture import check_upload_dir

        check_upload_dir(settings.UPLOAD_DIR)
    else:
        from worker.uploads.s3_settings import check_source

        check_source(settings)
    configuration = env_file(settings)
    if configuration is None:
        warnings.append("no .env to put in the set (settings come from the environment): set TMA_ENV_FILE to "
                        "TMA Cloud's .env so that a restore has its configuration and FILE_ENCRYPTION_KEY")
    else:
        try:
            if not stat.S_ISREG(configuration.stat().st_mode):
                raise BackupError(f"the configuration file {configuration} is not a regular file (TMA_ENV_FILE)")
            with open(configuration, "rb"):
                pass
        except OSError as error:
            raise BackupError(f"cannot read the configuration file {configuration} for the set: {error.strerror} "
                              "(TMA_ENV_FILE)") from None
    if settings.FILE_ENCRYPTION_KEY is None:
        warnings.append("FILE_ENCRYPTION_KEY is not set here: the set cannot record which key its uploads need")
    return warnings


def keep_configuration(settings: Settings, database: str, backup: Path) -> Path | None:
    """Copy TMA Cloud's configuration file beside the backup being made (`<backup>.env`, mode 0600 from
    its creation), as it is now, for the set: the offsite link, tonight or after an outage, sends this
    copy. None when the set takes no configuration (another database, no uploads, no `.env`)."""
    source = env_file(settings) if uploads_enabled(settings, database) else None
    if source is None:
        return None
    target = catalogue.env_path(backup)
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as copy, open(source, "rb") as original:
            shutil.copyfileobj(original, copy)
            copy.flush()
            os.fsync(copy.fileno())
    except OSError as error:
        raise BackupError(f"cannot keep the configuration file {source} beside the backup: {error.strerror} "
                          "(TMA_ENV_FILE)") from None
    return target
