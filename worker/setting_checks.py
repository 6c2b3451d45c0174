"""The checks the settings make of paths and names, and the backup folder's own (`worker.settings` holds
the settings themselves and re-exports everything here, so `from worker.settings import …` keeps working).

The value checks raise ValueError saying what is expected (pydantic turns it into one line naming the
variable); `ensure_backup_dir` raises SettingsError, which is defined here for that reason.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.settings import Settings

# restic's backends other than a local folder (`restic init --help`): their addresses are left as given.
REMOTE_BACKENDS = ("s3:", "sftp:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:")
LOCAL_BACKEND = "local:"


class SettingsError(Exception):
    """A setting is missing or wrong; the message names the variable and says what is expected."""


def absolute_path(value: Path) -> Path:
    """`value` with `~` expanded, made absolute against the working folder (not resolved: a symlink in it
    stays one)."""
    if "\0" in str(value):
        raise ValueError("must not contain a NUL character")
    try:
        return value.expanduser().absolute()
    except RuntimeError:  # `~user/...` for a user this machine does not know
        raise ValueError("names the home folder of an unknown user") from None


def readable_file(value: Path, what: str) -> Path:
    """`value` made absolute, which must be a regular file this process can read; else ValueError
    saying it must be `what`."""
    path = absolute_path(value)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # stat first: opening a FIFO would block
            raise ValueError(f"must be {what}, not a folder or a special file")
        with open(path, "rb"):  # readable by this process, as libpq and Celery will need it to be
            pass
    except OSError as error:
        raise ValueError(f"must be {what} ({error.strerror})") from None
    return path


def readable_cert_store(value: Path) -> Path:
    """TASK_SIGNING_CERT_STORE: a readable folder holding at least one (non-hidden) entry."""
    path = absolute_path(value)
    try:
        if not stat.S_ISDIR(path.stat().st_mode):
            raise ValueError("must be a folder of PEM certificates")
        if not any(not entry.name.startswith(".") for entry in os.scandir(path)):
            raise ValueError("must be a folder holding at least one PEM certificate (it is empty)")
    except OSError as error:
        raise ValueError(f"must be a readable folder of PEM certificates ({error.strerror})") from None
    return path


def repository_address(value: str) -> str:
    """BACKUP_REPOSITORY, checked, and a local folder made absolute once, here: restic runs in other
    folders too (the uploads capture runs it inside UPLOAD_DIR), where a relative path names another
    place. A local folder is what restic itself takes it for: `local:PATH`, or any address without one of
    its other backends' prefixes (`REMOTE_BACKENDS`, left exactly as given)."""
    value = value.strip()
    if not value.isprintable() or "\n" in value:
        raise ValueError("must be a restic repository address without control characters")
    if value.startswith("s3:"):
        rest = value.removeprefix("s3:").split("://", 1)[-1]
        bucket = rest.split("/")[1] if "/" in rest else ""
        if not bucket:
            raise ValueError("must name a bucket: s3:https://host[:port]/bucket[/prefix]")
    if value.startswith(REMOTE_BACKENDS):
        return value
    prefix = LOCAL_BACKEND if value.startswith(LOCAL_BACKEND) else ""
    folder = value.removeprefix(prefix).strip()
    if not folder:
        raise ValueError("must name a folder after local: (or a restic address: s3:, sftp:, rest:, …)")
    return prefix + str(absolute_path(Path(folder)))


def check_database_name(name: str) -> str:
    """A database name also names files in BACKUP_DIR (`<name>_<timestamp>.dump`): it must not be empty,
    contain `/` or NUL, be `.` or `..`, or be longer than PostgreSQL's 63 bytes. Raises ValueError saying so."""
    if not name or "/" in name or "\0" in name or name in {".", ".."}:
        raise ValueError("must be a non-empty database name without '/' (it names the backup files)")
    if len(name.encode("utf-8", "surrogateescape")) > 63:
        raise ValueError("must be at most 63 bytes long (PostgreSQL's limit for a name)")
    return name


def folder_warning(directory: Path) -> str | None:
    """A warning when BACKUP_DIR lets other users in (group or other permission bits).

    An existing folder's mode is the operator's decision and is left as it is (another tool, such as an
    off-site copy running under a group, may rely on it); every file tma-backup writes is 0600 anyway,
    from its creation on, so the folder's mode exposes names and sizes, never contents."""
    try:
        mode = directory.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"BACKUP_DIR {directory} is mode {mode:04o}: other users can list it; backups are created "
            f"0600 regardless, but `chmod 700 {directory}` keeps even their names private"
        )
    return None


def ensure_backup_dir(settings: Settings) -> Path:
    """Create BACKUP_DIR (mode 0700) if its parent exists, and prove it is writable by writing to it."""
    directory = settings.backup_dir
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        raise SettingsError(f"BACKUP_DIR: {directory} is not a writable folder ({error.strerror})") from None
    return directory
