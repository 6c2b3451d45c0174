"""What the whole set takes from the settings: whether uploads are captured, from where, and which
configuration file goes with them. Checked when a run starts, before anything is written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from worker.errors import BackupError
from worker.settings import Settings


def uploads_enabled(settings: Settings) -> bool:
    """Uploads go into the sets when there is a repository and TMA's storage is configured: UPLOAD_DIR
    for the local driver, or the S3 settings with STORAGE_DRIVER=s3."""
    if not settings.repository:
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


def check_set_inputs(settings: Settings) -> list[str]:
    """Refuse a run whose set could not be made (one line each); warnings for what it will lack."""
    if not uploads_enabled(settings):
        if settings.repository and settings.STORAGE_DRIVER == "s3":  # TMA would refuse to start like this
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
