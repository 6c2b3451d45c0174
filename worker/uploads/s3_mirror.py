"""The mirror of TMA Cloud's S3 bucket: the source of the uploads with STORAGE_DRIVER=s3.

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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.archive.meta import human_size, write_atomically
from worker.progress import Progress, no_progress
from worker.settings import Settings
from worker.uploads.references import escapes
from worker.uploads.s3_errors import SourceError, _code, _Incomplete, explain
from worker.uploads.s3_settings import S3Source, missing_settings_warning, s3_settings

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


logger = logging.getLogger(__name__)


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
