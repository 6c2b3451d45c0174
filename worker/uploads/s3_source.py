"""TMA Cloud's S3 storage as the source of the uploads (STORAGE_DRIVER=s3).

TMA's bucket is mirrored into `BACKUP_DIR/.uploads-mirror/<database>/` (object key → file path), then
that folder is captured as the set's uploads part exactly as UPLOAD_DIR is for the local driver (restic,
incremental from the previous part). The mirror is incremental too: each run lists the bucket and
downloads only the objects whose size or ETag differ from its manifest, or whose file is missing (TMA
never rewrites a key in place, except its key-rotation script, which changes the ETag), and deletes the
files of keys gone from the bucket.

The manifest (key, size, ETag, version id when the bucket keeps versions, last-modified) lives inside
the mirror as `.tma-backup-manifest.json`, so every set holds it; the cross-check does not count it.

Disk: the mirror is a full copy of the bucket on the worker's disk, beside the dumps in BACKUP_DIR: the
bucket's size again, for good (it is what makes the next run incremental). The room needed for a run's
downloads is checked before anything is downloaded.

Secrets: TMA's keys go to boto3's client in this process only: never in argv, logs, results or the .meta.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import stat
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.archive.meta import human_size, write_atomically
from worker.errors import BackupError
from worker.progress import Progress, no_progress
from worker.settings import Settings
from worker.uploads.references import escapes

MIRROR_FOLDER = ".uploads-mirror"
DOWNLOAD_FOLDER = ".uploads-download"  # downloads in progress, renamed into the mirror when complete
MANIFEST_NAME = ".tma-backup-manifest.json"
DOWNLOAD_THREADS = 8
CONNECT_TIMEOUT = 10  # seconds; then botocore's bounded retries (ATTEMPTS in all)
READ_TIMEOUT = 60
ATTEMPTS = 3
CHUNK = 1 << 20
NAMES_SHOWN = 20
DOWNLOADING = "downloading uploads from TMA Cloud's bucket"
CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidSecretKey", "AccessDenied",
                    "InvalidToken", "AuthorizationHeaderMalformed", "Forbidden", "403"}


logger = logging.getLogger(__name__)


class SourceError(BackupError):
    """The uploads cannot be taken from TMA Cloud's bucket; `str()` is one line saying why."""


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


@dataclass
class Entry:
    size: int
    etag: str
    last_modified: str
    version_id: str | None = None


@dataclass
class Mirror:
    """One run's mirror of the bucket: the folder restic captures, and what the run did to it."""

    folder: Path
    source: str
    versioning: bool
    versioning_problem: str | None
    objects: int
    downloaded: int
    downloaded_bytes: int
    deleted: int
    refused: list[str]  # keys that cannot be a file in the mirror (absolute, `..`, NUL, …): not in the set
    unreadable: list[str]  # keys that could not be downloaded (named; a referenced one counts as missing)
    seconds: float

    def fields(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_objects": self.objects,
            "source_versioning": self.versioning,
            "downloaded": self.downloaded,
            "downloaded_bytes": self.downloaded_bytes,
            "source_deleted": self.deleted,
            "source_refused": len(self.refused),
            "source_refused_names": self.refused[:NAMES_SHOWN],
            "mirror_seconds": round(self.seconds, 3),
        }

    def warnings(self) -> list[str]:
        found = []
        if not self.versioning:
            found.append(f"TMA Cloud's bucket at {self.source} keeps no versions"
                         + (f" (cannot tell: {self.versioning_problem})" if self.versioning_problem else "")
                         + ": an object deleted or overwritten between two runs is lost for good; enable "
                           "versioning on the bucket")
        if self.refused:
            found.append(f"{len(self.refused)} object key(s) in TMA Cloud's bucket cannot be files (absolute, `..`, "
                         f"NUL, `//`) and are not in the set: {', '.join(self.refused[:5])}"
                         + (" …" if len(self.refused) > 5 else ""))
        return found


def mirror_path(settings: Settings, database: str) -> Path:
    return settings.backup_dir / MIRROR_FOLDER / database


def sync_mirror(settings: Settings, database: str, progress: Progress = no_progress) -> Mirror:
    """Bring the mirror of TMA's bucket up to date (see the module's docstring). Raises SourceError with
    one line when the bucket cannot be listed, the disk lacks room, or the source stops answering; one
    object that cannot be downloaded is named in `unreadable` instead. Nothing else escapes: the dump
    this run just made must not be lost to a surprise here (the traceback goes to the log)."""
    source = s3_settings(settings)
    if source is None:
        raise SourceError(missing_settings_warning(settings))
    try:
        return _sync(settings, source, database, progress)
    except SourceError:
        raise
    except Exception as error:
        logger.error("mirroring TMA Cloud's bucket failed", exc_info=True)
        raise explain(error, source) from None


def _sync(settings: Settings, source: S3Source, database: str, progress: Progress) -> Mirror:
    started = time.monotonic()
    folder = mirror_path(settings, database)
    staging = settings.backup_dir / DOWNLOAD_FOLDER / database
    try:
        for directory in (folder.parent, folder, staging.parent):
            _private_dir(directory)
        shutil.rmtree(staging, ignore_errors=True)  # a killed run's half-downloaded objects
        _private_dir(staging)
    except OSError as error:
        raise SourceError(f"cannot make the mirror of TMA Cloud's bucket in {folder}: {error.strerror}") from None
    client = _client(source)
    progress("listing TMA Cloud's bucket", {})
    listing = _list(client, source)
    versioning, versioning_problem = _versioning(client, source)
    refused = sorted(key for key in listing if not mirrorable(key))
    keys = {key: entry for key, entry in listing.items() if mirrorable(key)}
    folders: set[str] = set()
    for key in keys:
        name = posixpath.dirname(key)
        while name and name not in folders:
            folders.add(name)
            name = posixpath.dirname(name)
    unreadable = sorted(key for key in keys if key in folders)  # `a` beside `a/b`: not both can be files
    for key in unreadable:
        del keys[key]
    previous = _load_manifest(folder)
    try:
        present = _tidy(folder, set(keys))
    except OSError as error:
        raise SourceError(f"cannot tidy the mirror of TMA Cloud's bucket in {folder}: {error.strerror}") from None
    deleted = sum(1 for key in previous if key not in keys)
    entries = {key: previous[key] for key, entry in keys.items()
               if key in previous and present.get(key) == entry.size
               and (previous[key].size, previous[key].etag) == (entry.size, entry.etag)}
    wanted = sorted(key for key in keys if key not in entries)
    needed = sum(keys[key].size for key in wanted)
    free = shutil.disk_usage(folder).free
    if needed > free:
        _write_manifest(folder, source, versioning, entries)
        raise SourceError(f"not enough room in {settings.backup_dir} for TMA Cloud's bucket mirror: "
                          f"{human_size(needed)}B to download, {human_size(free)}B free (the mirror holds a copy of "
                          "the whole bucket)")
    downloaded = downloaded_bytes = 0
    try:
        downloaded, downloaded_bytes = _download_all(client, source, wanted, keys, folder, staging, entries,
                                                     unreadable, progress)
        if versioning:
            _fill_versions(client, source, entries)
    finally:
        _write_manifest(folder, source, versioning, entries)
        shutil.rmtree(staging, ignore_errors=True)
    return Mirror(
        folder=folder, source=source.where, versioning=versioning, versioning_problem=versioning_problem,
        objects=len(listing), downloaded=downloaded, downloaded_bytes=downloaded_bytes, deleted=deleted,
        refused=refused, unreadable=sorted(unreadable),
        seconds=time.monotonic() - started,
    )


def mirrorable(key: str) -> bool:
    """A key that is one file path inside the mirror, and the same path back: not absolute, no `..`,
    NUL, `.` or empty segment, not a folder marker, not the manifest's own name, no name over 255 bytes."""
    return (not escapes(key) and posixpath.normpath(key) == key and key != MANIFEST_NAME
            and all(len(part.encode("utf-8", "surrogateescape")) <= 255 for part in key.split("/")))


def _private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not stat.S_ISDIR(path.lstat().st_mode):
            raise NotADirectoryError(20, os.strerror(20), str(path)) from None


def _client(source: S3Source) -> Any:
    import boto3
    from botocore.config import Config

    for name in ("botocore", "boto3", "urllib3"):  # their DEBUG output carries request headers
        library = logging.getLogger(name)
        if library.getEffectiveLevel() < logging.INFO:
            library.setLevel(logging.INFO)
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=source.endpoint, region_name=source.region,
        aws_access_key_id=source.access_key, aws_secret_access_key=source.secret_key,
        config=Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                      retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                      s3={"addressing_style": "path" if source.path_style else "virtual"},
                      max_pool_connections=DOWNLOAD_THREADS * 2),
    )


def _list(client: Any, source: S3Source) -> dict[str, Entry]:
    listing: dict[str, Entry] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket):
            for item in page.get("Contents", []):
                key = str(item["Key"])
                if key.endswith("/") and int(item.get("Size", 0)) == 0:
                    continue  # a folder marker some consoles create: no upload
                listing[key] = Entry(int(item.get("Size", 0)), _etag(item.get("ETag")),
                                     _moment(item.get("LastModified")))
    except Exception as error:
        raise explain(error, source) from None
    return listing


def _versioning(client: Any, source: S3Source) -> tuple[bool, str | None]:
    """Whether the bucket keeps versions; a store that will not say (R2, a denied permission) is
    treated as keeping none, with the reason."""
    from botocore.exceptions import ClientError

    try:
        answer = client.get_bucket_versioning(Bucket=source.bucket)
    except ClientError as error:
        return False, _code(error)
    except Exception as error:
        raise explain(error, source) from None
    return answer.get("Status") == "Enabled", None


def _tidy(folder: Path, keys: set[str]) -> dict[str, int]:
    """Delete from the mirror every file whose key the bucket no longer has (and anything that is no
    regular file of ours: a link, a socket); empty folders too. Returns path → size of what stays."""
    present: dict[str, int] = {}
    for top, folders, files in os.walk(folder, topdown=False):
        relative = Path(top).relative_to(folder).as_posix()
        for name in files + folders:
            path = Path(top) / name
            key = name if relative == "." else f"{relative}/{name}"
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                if not any(path.iterdir()):
                    path.rmdir()
            elif stat.S_ISREG(info.st_mode) and key in keys:
                present[key] = info.st_size
            elif not (stat.S_ISREG(info.st_mode) and key == MANIFEST_NAME):
                path.unlink()
    return present


def _download_all(client: Any, source: S3Source, wanted: list[str], keys: dict[str, Entry], folder: Path,
                  staging: Path, entries: dict[str, Entry], unreadable: list[str],
                  progress: Progress) -> tuple[int, int]:
    """Download `wanted` in a few threads; `entries` gains each object once its file is in place.
    Returns how many objects and bytes were downloaded."""
    if not wanted:
        return 0, 0
    total = sum(keys[key].size for key in wanted)
    count = done = 0
    stop = threading.Event()

    def one(key: str) -> tuple[str, Entry | None, str | None]:
        if stop.is_set():
            return key, None, None
        return (key, *_download(client, source, key, folder, staging))

    progress(DOWNLOADING, {"bytes_done": 0, "total_bytes": total})
    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="s3-mirror") as pool:
        pending: set[Future[tuple[str, Entry | None, str | None]]] = {pool.submit(one, key) for key in wanted}
        try:
            while pending:
                finished, pending = wait(pending, timeout=1, return_when=FIRST_EXCEPTION)
                for future in finished:
                    key, entry, problem = future.result()  # raises the first fatal error
                    if entry is not None:
                        entries[key] = entry
                        count += 1
                        done += entry.size
                    else:  # gone since the listing, or refused: no stale copy of it in the set
                        (folder / key).unlink(missing_ok=True)
                        if problem is not None:
                            unreadable.append(key)
                if finished:
                    progress(DOWNLOADING, {"bytes_done": done, "total_bytes": total})
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return count, done


def _download(client: Any, source: S3Source, key: str, folder: Path,
              staging: Path) -> tuple[Entry | None, str | None]:
    """One object into the mirror: (its entry, None); (None, None) when it vanished since the listing;
    (None, why) when the store refuses this object. A source that stops answering raises SourceError."""
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError

    last: BaseException | None = None
    for _ in range(ATTEMPTS):  # botocore retries the request; a body cut short is retried here
        try:
            response = client.get_object(Bucket=source.bucket, Key=key)
        except ClientError as error:
            return None, (None if _code(error) in ("NoSuchKey", "404") else _code(error))
        except BotoCoreError as error:
            raise explain(error, source) from None
        temporary = staging / uuid.uuid4().hex
        try:
            written = _stream(response, temporary)
        except (BotoCoreError, HTTPError, _Incomplete) as error:
            temporary.unlink(missing_ok=True)
            last = error
            continue
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise SourceError(f"cannot write the mirror of TMA Cloud's bucket in {folder}: {error.strerror}") from None
        modified = response.get("LastModified")
        target = folder / key
        try:
            if isinstance(modified, datetime):  # restored files keep the object's time
                os.utime(temporary, (modified.timestamp(), modified.timestamp()))
            for parent in reversed(target.relative_to(folder).parents[:-1]):
                _private_dir(folder / parent)
            os.replace(temporary, target)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise SourceError(f"cannot write the mirror of TMA Cloud's bucket in {folder}: {error.strerror}") from None
        return Entry(written, _etag(response.get("ETag")), _moment(modified), response.get("VersionId")), None
    raise explain(last or RuntimeError("no answer"), source)


def _stream(response: dict[str, Any], temporary: Path) -> int:
    """The object's body into `temporary` (created, mode 0600); its length, checked against Content-Length."""
    body = response["Body"]
    written = 0
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                handle.write(chunk)
                written += len(chunk)
    finally:
        body.close()
    expected = int(response.get("ContentLength", written))
    if written != expected:
        raise _Incomplete(f"the body ended after {written} of {expected} bytes")
    return written


class _Incomplete(Exception):
    """The body ended before its Content-Length."""


def _fill_versions(client: Any, source: S3Source, entries: dict[str, Entry]) -> None:
    """The version id of objects mirrored before the bucket kept versions (once: then it is kept)."""
    from botocore.exceptions import ClientError

    def head(key: str) -> tuple[str, str | None]:
        try:
            return key, client.head_object(Bucket=source.bucket, Key=key).get("VersionId")
        except ClientError:
            return key, None

    lacking = [key for key, entry in entries.items() if entry.version_id is None]
    if not lacking:
        return
    try:
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="s3-versions") as pool:
            for key, version in pool.map(head, lacking):
                entries[key].version_id = version
    except Exception as error:
        raise explain(error, source) from None


def _load_manifest(folder: Path) -> dict[str, Entry]:
    """The previous run's manifest; a missing or damaged one only means everything is downloaded again."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        return {str(key): Entry(int(item["size"]), str(item["etag"]), str(item.get("last_modified", "")),
                                item.get("version_id")) for key, item in data["objects"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_manifest(folder: Path, source: S3Source, versioning: bool, entries: dict[str, Entry]) -> None:
    manifest = {
        "format": 1,
        "source": source.where,
        "versioning": versioning,
        "objects": {key: asdict(entries[key]) for key in sorted(entries)},
    }
    write_atomically(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _etag(value: Any) -> str:
    return str(value or "").strip('"')


def _moment(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value or "")


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
