"""TMA Cloud's S3 storage as a source of uploads (STORAGE_DRIVER=s3). Placeholder until the S3 driver lands."""

from __future__ import annotations

from worker.settings import Settings


def s3_configured(settings: Settings) -> bool:
    return False
