"""Failures talking to TMA Cloud's bucket (STORAGE_DRIVER=s3), each as one line an operator can act on.

botocore's and urllib3's errors become a `SourceError` naming the bucket and, for refused credentials,
the variables the keys came from: never the keys themselves.
"""

from __future__ import annotations

from typing import Any

from worker.errors import BackupError
from worker.uploads.s3_settings import S3Source

CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidSecretKey", "AccessDenied",
                    "InvalidToken", "AuthorizationHeaderMalformed", "Forbidden", "403"}


class SourceError(BackupError):
    """The uploads cannot be taken from TMA Cloud's bucket; `str()` is one line saying why."""


class _Incomplete(Exception):
    """The body ended before its Content-Length."""


def _code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code") or _status(error))


def _status(error: Any) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def explain(error: BaseException, source: S3Source) -> SourceError:
    """A failure talking to TMA's bucket as one line an operator can act on, with no secret in it."""
    from botocore.exceptions import ClientError

    where = source.where
    if isinstance(error, SourceError):
        return error
    if isinstance(error, ClientError):
        code = _code(error)
        message = str(error.response.get("Error", {}).get("Message") or "")
        if code in CREDENTIAL_CODES:
            line = (f"TMA Cloud's bucket at {where} refused the credentials ({code}): check {source.key_names} "
                    "in TMA's .env")
        elif code == "NoSuchBucket":
            line = f"TMA Cloud's bucket {source.bucket!r} does not exist at {where} ({source.bucket_name})"
        else:
            line = f"TMA Cloud's bucket at {where} answered {code}" + (f": {message}" if message else "")
    elif _is_network(error):
        line = f"cannot reach TMA Cloud's bucket at {where}: {_reason(error)}"
    else:
        line = f"cannot mirror TMA Cloud's bucket at {where}: {type(error).__name__}: {_reason(error)}"
    for secret in (source.access_key, source.secret_key):
        line = line.replace(secret, "***")
    return SourceError(" ".join(line.split()))


def _is_network(error: BaseException) -> bool:
    from botocore.exceptions import ConnectionError, HTTPClientError
    from urllib3.exceptions import HTTPError

    return isinstance(error, (ConnectionError, HTTPClientError, HTTPError, _Incomplete))


def _reason(error: BaseException) -> str:
    """The cause under botocore's wrapper: `connection refused`, a timeout, a name that does not resolve."""
    cause = getattr(error, "kwargs", {}).get("error")
    text = str(cause if cause is not None else error).strip()
    if "[Errno" in text:
        text = text.rsplit("] ", 1)[-1]
        text = text[:-1] if text.endswith(")") and text.count(")") > text.count("(") else text
    text = text[:200] or type(error).__name__
    return text[:1].lower() + text[1:]
