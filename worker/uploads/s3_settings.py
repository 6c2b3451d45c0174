"""TMA Cloud's S3 settings (STORAGE_DRIVER=s3): which bucket the uploads come from.

TMA's own variables (R2_*, RUSTFS_*, AWS_S3_*/AWS_*) resolved with TMA's own precedence
(backend/config/storage.js), whether they are complete, and an endpoint check before anything is
written. The bucket itself is read by `s3_mirror`; its failures are worded by `s3_errors`.

Secrets: the keys are held in `S3Source` out of its repr; see `s3_mirror` for where they go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from worker.errors import BackupError
from worker.settings import Settings


@dataclass(frozen=True)
class S3Source:
    """TMA Cloud's bucket, resolved with TMA's own precedence (backend/config/storage.js)."""

    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str
    path_style: bool
    key_names: str  # the variables the keys came from, for error lines (never their values)
    bucket_name: str  # the variable the bucket came from

    @property
    def where(self) -> str:
        """`<endpoint>/<bucket>`, without any user:password@ an endpoint may carry."""
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}/{self.bucket}"


def _text(value: Any) -> str | None:
    """A setting as TMA's `||` sees it: unset and empty are the same."""
    if value is None:
        return None
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return text or None


def _first(settings: Settings, *names: str) -> tuple[str | None, str | None]:
    for name in names:
        value = _text(getattr(settings, name))
        if value is not None:
            return value, name
    return None, None


def _resolve(settings: Settings) -> dict[str, tuple[str | None, str | None]]:
    account = _text(settings.R2_ACCOUNT_ID)
    r2_endpoint = _text(settings.R2_ENDPOINT) or (f"https://{account}.r2.cloudflarestorage.com" if account else None)
    endpoint = ((r2_endpoint, "R2_ENDPOINT" if _text(settings.R2_ENDPOINT) else "R2_ACCOUNT_ID") if r2_endpoint
                else _first(settings, "RUSTFS_ENDPOINT", "AWS_S3_ENDPOINT"))
    return {
        "endpoint": endpoint,
        "bucket": _first(settings, "R2_BUCKET", "RUSTFS_BUCKET", "AWS_S3_BUCKET"),
        "access key": _first(settings, "R2_ACCESS_KEY_ID", "RUSTFS_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        "secret key": _first(settings, "R2_SECRET_ACCESS_KEY", "RUSTFS_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    }


def s3_settings(settings: Settings) -> S3Source | None:
    """TMA's bucket from TMA's variables and precedence, or None when one of endpoint, bucket and the two
    keys is missing (TMA itself then refuses to start with STORAGE_DRIVER=s3)."""
    found = _resolve(settings)
    if any(value is None for value, _ in found.values()):
        return None
    is_r2 = bool((_text(settings.R2_ENDPOINT) or _text(settings.R2_ACCOUNT_ID)) and _text(settings.R2_BUCKET)
                 and _text(settings.R2_ACCESS_KEY_ID) and _text(settings.R2_SECRET_ACCESS_KEY))
    region = "auto" if is_r2 else (_text(settings.RUSTFS_REGION) or _text(settings.AWS_REGION) or "us-east-1")
    path_style = False if is_r2 else settings.RUSTFS_FORCE_PATH_STYLE != "false"
    return S3Source(
        endpoint=str(found["endpoint"][0]), bucket=str(found["bucket"][0]),
        access_key=str(found["access key"][0]), secret_key=str(found["secret key"][0]),
        region=region, path_style=path_style, key_names=f"{found['access key'][1]} / {found['secret key'][1]}",
        bucket_name=str(found["bucket"][1]),
    )


def s3_configured(settings: Settings) -> bool:
    """STORAGE_DRIVER=s3 with endpoint, bucket and both keys set: the uploads come from TMA's bucket."""
    return settings.STORAGE_DRIVER == "s3" and s3_settings(settings) is not None


def missing_settings_warning(settings: Settings) -> str:
    """Why STORAGE_DRIVER=s3 gives no uploads: what TMA's variables lack."""
    missing = [what for what, (value, _) in _resolve(settings).items() if value is None]
    return (f"STORAGE_DRIVER=s3 but TMA Cloud's bucket settings lack the {', '.join(missing)} (R2_*, RUSTFS_* or "
            "AWS_S3_*/AWS_*, as in TMA's .env): the sets will hold no uploads")


def check_source(settings: Settings) -> None:
    """Refuse, before anything is written, an endpoint boto3 could never use."""
    source = s3_settings(settings)
    if source is None:
        return
    parts = urlsplit(source.endpoint)
    try:
        parts.port  # noqa: B018  (raises on a port that is no number, or out of range)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise BackupError("the endpoint of TMA Cloud's bucket (R2_ENDPOINT, R2_ACCOUNT_ID, RUSTFS_ENDPOINT or "
                          "AWS_S3_ENDPOINT) must be an http:// or https:// URL")
