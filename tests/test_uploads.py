"""The whole TMA Cloud set (issue 12), local storage driver: the uploads of a real UPLOAD_DIR (named by
`files.path`, written as TMA Cloud writes them: `[IV][data][tag]`, 32 bytes over `files.size`) captured
into a real restic repository beside the dump and the `.env`, cross-checked against the references read
in the dump's own snapshot, and restored together with the database (swap, rollback, `--uploads-only`),
against the session's PostgreSQL, restic, a local-path repository or the SeaweedFS `s3` fixture, and a
real Celery worker for the fresh-machine restore.

The repository is read back with the plain `restic` CLI (as an operator would, the night tma-backup is
gone); the files with SHA-256 digests of every byte. Faults of the restore: tests/test_faults_uploads.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests import services, tma_cloud
from tests.conftest import _unavailable, base_env, run_cli
from tests.helpers import PsSampler, error_lines, leftovers, only_backup
from tests.test_repository import (
    REPOSITORY_PASSWORD,
    Repository,
    local_repository,
    redis_values,
    restic,
    restic_init,
    s3_repository,
    snapshots,
    tag_value,
)
from tests.test_restore import digests, managed_databases
from worker.archive import catalogue
from worker.archive.meta import BackupMeta, read_meta

# Distinctive, so that a search for it in outputs, metas, logs and results cannot match by accident.
FILE_KEY = "Tma-File-Encryption-Key-For-Tests-4c1d9e7b2a66"
KEY_SHA256 = hashlib.sha256(FILE_KEY.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Helpers (tests/test_faults_uploads.py uses them too)


@dataclass
class Site:
    """One TMA Cloud deployment as these tests see it: its database (with uploads rows), its UPLOAD_DIR,
    its `.env` (TMA_ENV_FILE: STORAGE_DRIVER, UPLOAD_DIR and FILE_ENCRYPTION_KEY come from it, as in a
    TMA Cloud deployment) and the repository; `env` is what the tma-backup CLI is started with."""

    database: str
    uploads: tma_cloud.Uploads
    env_file: Path
    repository: Repository
    env: dict[str, str]
    cwd: Path

    @property
    def folder(self) -> Path:
        return self.uploads.folder

    @property
    def backup_dir(self) -> Path:
        return Path(self.env["BACKUP_DIR"])


def write_env_file(path: Path, upload_dir: Path, key: str = FILE_KEY) -> Path:
    path.write_text("# TMA Cloud's .env (the parts tma-backup reads)\nSTORAGE_DRIVER=local\n"
                    f"UPLOAD_DIR={upload_dir}\nFILE_ENCRYPTION_KEY={key}\nNODE_ENV=production\n")
    path.chmod(0o600)
    return path


def make_site(pg: services.PostgresServer, database: str, tmp_path: Path, repository: Repository, n: int = 40,
              sizes: tuple[int, int] = (256, 4096), upload_dir: Path | None = None, **settings: str) -> Site:
    folder = upload_dir or tmp_path / "uploads"
    with pg.connect(database, autocommit=True) as connection:
        made = tma_cloud.make_uploads(connection, folder, n, sizes=sizes)
    env_file = write_env_file(tmp_path / "tma-cloud.env", folder)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700, exist_ok=True)
    env = base_env(pg, backups, DB_NAME=database, TMA_ENV_FILE=str(env_file), **repository.settings, **settings)
    return Site(database, made, env_file, repository, env, tmp_path)


@pytest.fixture
def repo(restic_bin: str, tmp_path: Path) -> Repository:
    """A fresh, initialised local-path repository."""
    return restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))


@pytest.fixture
def site(pg: services.PostgresServer, tma_db: str, repo: Repository, tmp_path: Path) -> Site:
    return make_site(pg, tma_db, tmp_path, repo)


def backup(site: Site, env: dict[str, str] | None = None) -> tuple[Any, Path, BackupMeta]:
    """A successful in-process backup; returns the CLI's result and the newest backup with its .meta."""
    result = run_cli(["backup"], env or site.env, site.cwd)
    assert result.returncode == 0, result.output
    assert error_lines(result.stderr) == [], result.output
    dump = newest_backup(site)
    return result, dump, read_meta(catalogue.meta_path(dump))


def newest_backup(site: Site) -> Path:
    found = sorted(site.backup_dir.glob(f"{site.database}_*.dump"))
    assert found, "no backup"
    return found[-1]


def set_parts(restic_bin: str, repository: Repository, database: str, timestamp: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The database part and the uploads part of the set `database`/`timestamp`."""
    found = [snapshot for snapshot in snapshots(restic_bin, repository)
             if tag_value(snapshot, "db:") == database and tag_value(snapshot, "at:") == timestamp]
    by_part = {tag_value(snapshot, "part:"): snapshot for snapshot in found}
    assert sorted(by_part) == ["database", "uploads"] and len(found) == 2, [item.get("tags") for item in found]
    return by_part["database"], by_part["uploads"]


def listing(restic_bin: str, repository: Repository, snapshot: str) -> dict[str, int]:
    """The files of a snapshot (`restic ls`): path (relative, no leading /) → size."""
    found = {}
    for line in restic(restic_bin, repository, "ls", "--json", snapshot).stdout.splitlines():
        node = json.loads(line)
        if node.get("struct_type") == "node" and node.get("type") == "file":
            found[node["path"].lstrip("/")] = node["size"]
    return found


def dumped(restic_bin: str, repository: Repository, snapshot: str, name: str) -> bytes:
    return restic(restic_bin, repository, "dump", snapshot, "/" + name, binary=True).stdout


def restored_digests(restic_bin: str, repository: Repository, snapshot: str, target: Path) -> dict[str, str]:
    """Every file of a snapshot restored with bare `restic restore`, as SHA-256 digests."""
    restic(restic_bin, repository, "restore", snapshot, "--target", str(target))
    return tma_cloud.folder_digests(target, skip_ours=False)


def warn_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[WARN]")]


def secret_absent(text: str | bytes, *secrets: str) -> None:
    haystack = text.decode(errors="replace") if isinstance(text, bytes) else text
    for secret in secrets:
        assert secret not in haystack, f"a secret ({secret[:8]}…) appears"


def delete_row(pg: services.PostgresServer, database: str, path: str) -> None:
    with pg.connect(database, autocommit=True) as connection:
        connection.execute("DELETE FROM files WHERE path = %s", (path,))


def add_upload(pg: services.PostgresServer, site: Site, plain: int = 1000) -> str:
    """A new upload as TMA Cloud makes one: its blob, then its row."""
    import random

    name = tma_cloud.upload_name(random.Random())
    tma_cloud.write_blob(site.folder / name, plain)
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute("INSERT INTO files (owner_id, path, mime, size) SELECT min(id), %s, 'application/pdf', %s"
                           " FROM users", (name, plain))
    return name


def change_site(pg: services.PostgresServer, site: Site) -> None:
    """What TMA Cloud does after a backup: two uploads deleted (blob and row), three added, a user added."""
    for path in site.uploads.paths[-2:]:
        (site.folder / path).unlink()
        delete_row(pg, site.database, path)
    for _ in range(3):
        add_upload(pg, site)
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute("INSERT INTO users (email, name) VALUES ('late@example.com', 'Joined after the backup')")


def ours(folder: Path) -> list[str]:
    """tma-backup's own entries in UPLOAD_DIR."""
    return sorted(name for name in os.listdir(folder) if name.startswith(".tma-"))


def drop_kept_copies(admin: psycopg.Connection[Any]) -> None:
    for role in ("previous", "scratch"):
        for name in managed_databases(admin, role):
            tma_cloud.drop_database(admin, name)


@contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """`source` bind-mounted at `target` (compose's `./uploads:/app/uploads`). Needs root."""
    source.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        _unavailable(f"cannot bind-mount (needs root): {mounted.stderr.strip()}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False)


def is_mount_point(path: Path) -> bool:
    """Whether `path` is a mount point (`os.path.ismount` misses a bind mount within one file system)."""
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


@pytest.fixture(autouse=True)
def _no_kept_copies_left(admin: psycopg.Connection[Any]) -> Iterator[None]:
    yield
    drop_kept_copies(admin)


# ---------------------------------------------------------------------------------------------------
# 1. The whole set


def test_a_backup_stores_the_whole_set_byte_for_byte_and_the_key_only_as_its_fingerprint(
        site, restic_bin, tmp_path):
    with PsSampler() as sampler:
        result, dump, meta = backup(site)
    # The output: the uploads part and the cross-check.
    assert f"Uploads    : {len(site.uploads.sizes)} files" in result.stderr, result.output
    assert f"Cross-check: {len(site.uploads.sizes)} referenced, 0 missing, 0 unreferenced" in result.stderr
    assert warn_lines(result.stderr) == [], result.output
    # The .meta records the cross-check and the key's fingerprint.
    extra = meta.extra
    assert extra["uploads_missing"] == "0" and json.loads(extra["uploads_missing_names"]) == []
    assert extra["uploads_referenced"] == str(len(site.uploads.sizes))
    assert extra["uploads_files"] == str(len(site.uploads.sizes))
    on_disk = {path: (site.folder / path).stat().st_size for path in site.uploads.paths}
    assert extra["uploads_bytes"] == str(sum(on_disk.values()))
    assert extra["uploads_unreferenced"] == "0" and extra["uploads_escaping"] == "0" and extra["uploads_unreadable"] == "0"
    assert extra["file_encryption_key_sha256"] == KEY_SHA256

    # The repository: two parts of one set, tagged alike; restic alone reads every byte back.
    database_part, uploads_part = set_parts(restic_bin, site.repository, site.database, meta.timestamp)
    for part, name in ((database_part, "database"), (uploads_part, "uploads")):
        assert set(part["tags"]) >= {"tma-backup", f"db:{site.database}", f"at:{meta.timestamp}",
                                     f"run:{extra['run_id']}", f"part:{name}"}, part["tags"]
    assert extra["uploads_part"] == uploads_part["short_id"]
    assert listing(restic_bin, site.repository, uploads_part["id"]) == on_disk
    for path in site.uploads.paths[:3] + site.uploads.trashed[:1]:
        assert dumped(restic_bin, site.repository, uploads_part["id"], path) == (site.folder / path).read_bytes()
    restored = restored_digests(restic_bin, site.repository, uploads_part["id"], tmp_path / "restored-uploads")
    assert restored == tma_cloud.folder_digests(site.folder), "every upload, byte for byte"
    env_name = dump.name.removesuffix(".dump") + ".env"
    assert sorted(listing(restic_bin, site.repository, database_part["id"])) == sorted(
        [dump.name, catalogue.meta_path(dump).name, env_name])
    assert dumped(restic_bin, site.repository, database_part["id"], env_name) == site.env_file.read_bytes()
    assert dumped(restic_bin, site.repository, database_part["id"], dump.name) == dump.read_bytes()

    # The key itself: in the set's .env (the repository is encrypted) and in the copy of TMA Cloud's .env
    # kept beside the backup for its set (mode 0600, as TMA's own), nowhere else.
    secret_absent(result.output, FILE_KEY)
    kept_env = catalogue.env_path(dump)
    assert kept_env.read_bytes() == site.env_file.read_bytes() and kept_env.stat().st_mode & 0o777 == 0o600
    for path in site.backup_dir.rglob("*"):
        if path.is_file() and path != kept_env:
            secret_absent(path.read_bytes(), FILE_KEY)
    assert [line for line in sampler.lines if FILE_KEY in line] == [], "the key in a process's argv"
    assert any("part:uploads" in line for line in sampler.lines), "the sampler saw the capture"
    assert leftovers(site.backup_dir) == []
    assert not any(name.startswith(".offsite-staging") for name in os.listdir(site.backup_dir))


# ---------------------------------------------------------------------------------------------------
# 2. Incremental


@pytest.fixture
def restic_spy(tmp_path: Path, restic_bin: str) -> tuple[dict[str, str], Path]:
    """A `restic` first on the CLI's PATH that runs the real one and keeps a copy of what `restic backup`
    prints (its JSON messages: restic's own account of each capture) in a file per run, first line its
    working folder. Returns the PATH for the CLI and the folder of those files."""
    spy = tmp_path / "spy"
    (spy / "bin").mkdir(parents=True)
    (spy / "runs").mkdir()
    script = spy / "bin" / "restic"
    script.write_text(f"""#!/bin/bash
if [ "$1" = "backup" ]; then
  log="{spy}/runs/$(date +%s%N).jsonl"
  printf '%s\\n' "$PWD" > "$log"
  "{restic_bin}" "$@" | tee -a "$log"
  exit "${{PIPESTATUS[0]}}"
fi
exec "{restic_bin}" "$@"
""")
    script.chmod(0o755)
    return {"PATH": f"{spy / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}, spy / "runs"


def capture_summaries(runs: Path, folder: Path) -> list[dict[str, Any]]:
    """restic's summary of every `restic backup` run in `folder` (the uploads captures), oldest first."""
    found = []
    for log in sorted(runs.iterdir()):
        cwd, *lines = log.read_text().splitlines()
        if Path(cwd) != folder:
            continue
        summaries = [json.loads(line) for line in lines if '"message_type":"summary"' in line.replace(" ", "")]
        assert len(summaries) == 1, log.read_text()[-2000:]
        found.append(summaries[0])
    return found


def test_the_second_capture_reads_only_what_changed_and_stores_only_that(
        pg, tma_db, repo, restic_bin, restic_spy, tmp_path):
    spy_env, runs = restic_spy
    site = make_site(pg, tma_db, tmp_path, repo, n=200, sizes=(24_000, 40_000))
    site.env.update(spy_env)
    _, _, first = backup(site)
    total = int(first.extra["uploads_bytes"])
    assert total > 5_000_000

    changed = site.uploads.paths[::100]  # 1 % of the files: rewritten (new content, same size)
    changed_bytes = 0
    for path in changed:
        size = (site.folder / path).stat().st_size
        (site.folder / path).write_bytes(os.urandom(size))
        changed_bytes += size
    time.sleep(1.1)  # the next backup's timestamp (one a second)
    result, _, second = backup(site)

    added = int(second.extra["uploads_bytes_added"])
    assert changed_bytes <= added <= changed_bytes + 150_000, (added, changed_bytes)
    assert added < total / 10
    assert int(first.extra["uploads_bytes_added"]) >= total, "the first capture stored every byte"
    # restic's own account: the parent was used, unchanged files were not read again.
    [first_run, second_run] = capture_summaries(runs, site.folder)
    assert first_run["files_new"] == 200
    assert second_run["files_unmodified"] == 200 - len(changed), second_run
    assert second_run["files_changed"] == len(changed) and second_run["files_new"] == 0, second_run
    assert second_run["data_added"] == added
    _, second_part = set_parts(restic_bin, repo, tma_db, second.timestamp)
    assert str(second_part.get("parent", "")).startswith(first.extra["uploads_part"]), second_part
    assert listing(restic_bin, repo, second_part["id"]) == {
        path: (site.folder / path).stat().st_size for path in site.uploads.paths}
    assert "0 missing" in result.stderr


# ---------------------------------------------------------------------------------------------------
# 3. The cross-check


def test_a_referenced_upload_missing_before_the_run_is_named_counted_and_fails_status(site, restic_bin):
    paths = site.uploads.paths
    live = [path for path in paths if path not in site.uploads.trashed]
    gone = live[0]
    (site.folder / gone).unlink()  # a referenced blob lost before the run
    gone_from_trash = site.uploads.trashed[0]
    (site.folder / gone_from_trash).unlink()  # a trashed row is a reference until TMA purges it
    truncated = live[1]
    with open(site.folder / truncated, "r+b") as handle:  # not the size its row records
        handle.truncate(site.uploads.sizes[truncated] + 5)
    plain = live[2]  # stored unencrypted: exactly the size its row records, which is fine
    (site.folder / plain).write_bytes(os.urandom(site.uploads.sizes[plain]))
    orphan = "0123456789abcdef0123456789abcdef.pdf"  # a blob no row references (TMA's orphan cleanup)
    tma_cloud.write_blob(site.folder / orphan, 500)

    result, _, meta = backup(site)
    missing = sorted([gone, gone_from_trash, truncated])
    extra = meta.extra
    assert extra["uploads_referenced"] == str(len(paths)), "trashed rows count; the folder row does not"
    assert extra["uploads_missing"] == "3"
    assert json.loads(extra["uploads_missing_names"]) == missing
    assert extra["uploads_unreferenced"] == "1"
    assert f"Cross-check: {len(paths)} referenced, 3 missing, 1 unreferenced" in result.stderr
    [warning] = [line for line in warn_lines(result.stderr) if "missing" in line]
    assert warning.startswith("[WARN]  3 referenced upload(s) missing from the set: "), warning
    assert all(name in warning for name in missing), warning
    assert orphan not in warning

    status = run_cli(["status"], site.env, site.cwd)
    assert status.returncode == 1, status.output
    [line] = error_lines(status.stderr)
    assert "lacks 3 upload(s)" in line, line
    assert "Traceback" not in status.output


# ---------------------------------------------------------------------------------------------------
# 4. Bad input: one clear line, a non-zero exit, nothing published


def assert_refused(site: Site, env: dict[str, str], restic_bin: str, expected: str, code: int | None = None) -> str:
    result = run_cli(["backup"], env, site.cwd)
    assert result.returncode != 0 if code is None else result.returncode == code, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert list(site.backup_dir.glob("*.dump")) == [] and list(site.backup_dir.glob("*.meta")) == []
    assert leftovers(site.backup_dir) == []
    assert snapshots(restic_bin, site.repository) == [], "nothing sent"
    secret_absent(result.output, FILE_KEY)
    return lines[0]


def test_an_upload_dir_that_is_missing_or_not_a_folder_is_refused_before_anything_is_written(site, restic_bin, tmp_path):
    missing = tmp_path / "no-such-uploads"
    line = assert_refused(site, {**site.env, "UPLOAD_DIR": str(missing)}, restic_bin, "UPLOAD_DIR")
    assert str(missing) in line
    a_file = tmp_path / "uploads-is-a-file"
    a_file.write_text("not a folder")
    line = assert_refused(site, {**site.env, "UPLOAD_DIR": str(a_file)}, restic_bin, "is not a folder")
    assert "UPLOAD_DIR" in line


@pytest.mark.parametrize("query, expected", [
    ("SELECT path FRM files", "UPLOADS_REFERENCES_QUERY"),
    ("SELECT 1", "UPLOADS_REFERENCES_QUERY"),
    ("SELECT size, path FROM files", "UPLOADS_REFERENCES_QUERY"),
])
def test_a_references_query_that_fails_or_returns_no_text_path_is_one_line_and_exit_1(
        site, restic_bin, query, expected):
    assert_refused(site, {**site.env, "UPLOADS_REFERENCES_QUERY": query}, restic_bin, expected, code=1)


@pytest.mark.parametrize("kind", ["a folder", "a missing file"])
def test_a_configuration_file_that_cannot_be_read_is_one_line(site, restic_bin, tmp_path, kind):
    if kind == "a folder":
        target = tmp_path / "env-folder"
        target.mkdir()
    else:
        target = tmp_path / "no-such.env"
    env = {**site.env, "TMA_ENV_FILE": str(target), "UPLOAD_DIR": str(site.folder)}
    line = assert_refused(site, env, restic_bin, "TMA_ENV_FILE")
    assert str(target) in line


def test_references_leading_outside_upload_dir_are_reported_and_never_read(pg, site, restic_bin, tmp_path):
    marker = b"OUTSIDE-UPLOAD-DIR-NEVER-READ-5e8a1c" * 64
    outside = tmp_path / "outside-secret.bin"
    outside.write_bytes(marker)
    linked = "feedfacefeedfacefeedfacefeedface.pdf"
    (site.folder / linked).symlink_to(outside)
    escaping = sorted(["../outside-secret.bin", str(outside), linked])
    with pg.connect(site.database, autocommit=True) as connection:
        targets = site.uploads.paths[:3]
        for path, target in zip(escaping, targets, strict=True):
            connection.execute("UPDATE files SET path = %s WHERE path = %s", (path, target))
            (site.folder / target).unlink()

    result = run_cli(["backup"], site.env, site.cwd)
    # Never read: nothing of the outside file in any snapshot of the repository.
    for number, snapshot in enumerate(snapshots(restic_bin, site.repository)):
        target = tmp_path / f"restored-{number}"
        restic(restic_bin, site.repository, "restore", snapshot["id"], "--target", str(target))
        for path in target.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert marker[:36] not in path.read_bytes(), f"{path} holds the outside file's bytes"
    named = [line for line in result.stderr.splitlines() if "outside UPLOAD_DIR" in line]
    assert len(named) == 1 and all(reference in named[0] for reference in escaping), result.output
    metas = list(site.backup_dir.glob("*.meta"))
    for meta_path in metas:  # when a set is published, its .meta names them
        extra = read_meta(meta_path).extra
        assert extra["uploads_escaping"] == "3" and json.loads(extra["uploads_escaping_names"]) == escaping
        assert extra["uploads_missing"] == "0"
    # Issue 12: "Bad input, one clear line and a non-zero exit each: … a reference that escapes
    # UPLOAD_DIR (`../x`, an absolute path, a symlink out) is reported and never read".
    assert result.returncode != 0, "escaping references must fail the run (issue 12, bad input): " + result.output
    assert len(error_lines(result.stderr)) == 1 and "outside UPLOAD_DIR" in error_lines(result.stderr)[0], result.output


# ---------------------------------------------------------------------------------------------------
# 5. Permission denied on one file


def unprivileged(argv: list[str]) -> list[str]:
    """`argv` run without the privilege to read what its user may not: as root, without the capabilities
    that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: none at all), so permission
    checks apply to it as to any user (another uid cannot be used here: the venv's interpreter may live
    under /root); any other user is unprivileged already."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *argv]


def test_a_file_the_backup_user_cannot_read_is_named_and_counted_never_skipped_in_silence(site, restic_bin):
    denied = [path for path in site.uploads.paths if path not in site.uploads.trashed][0]
    (site.folder / denied).chmod(0)
    orphan = "00000000deadbeef00000000deadbeef.bin"  # unreferenced, unreadable too
    tma_cloud.write_blob(site.folder / orphan, 100)
    (site.folder / orphan).chmod(0)
    probe = subprocess.run(unprivileged(["cat", str(site.folder / denied)]), capture_output=True, text=True)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, "the probe read the file: not unprivileged"

    process = subprocess.run(unprivileged([services.TMA_BACKUP, "backup"]), env=site.env, cwd=site.cwd,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = process.stdout + process.stderr
    assert "Traceback" not in output
    assert process.returncode == 0, output
    _, meta = only_backup(site.backup_dir, site.database)
    extra = meta.extra
    assert extra["uploads_unreadable"] == "2"
    assert json.loads(extra["uploads_unreadable_names"]) == sorted([denied, orphan])
    assert extra["uploads_missing"] == "1" and json.loads(extra["uploads_missing_names"]) == [denied]
    assert extra["uploads_unreferenced"] == "0", "an unreadable orphan is not in the set"
    unreadable = [line for line in warn_lines(process.stderr) if "could not be read" in line]
    assert len(unreadable) == 1 and denied in unreadable[0] and orphan in unreadable[0], output
    missing = [line for line in warn_lines(process.stderr) if "missing from the set" in line]
    assert len(missing) == 1 and denied in missing[0] and orphan not in missing[0], output
    _, uploads_part = set_parts(restic_bin, site.repository, site.database, meta.timestamp)
    assert set(listing(restic_bin, site.repository, uploads_part["id"])) == set(site.uploads.paths) - {denied}
    status = run_cli(["status"], site.env, site.cwd)
    assert status.returncode == 1 and denied in status.stderr, status.output


# ---------------------------------------------------------------------------------------------------
# 6. Files deleted, modified and added while the capture runs


class CaptureInterferer:
    """Waits in a thread for the capture's `restic backup` (the only restic with `part:uploads` in its
    argv) to have an upload open, stops it there (SIGSTOP), deletes, modifies and adds files as TMA
    Cloud might meanwhile, and lets it go on (SIGCONT). restic reads a folder's files in name order."""

    def __init__(self, folder: Path, change: Any, past: str = "") -> None:
        self.folder = folder
        self.change = change
        self.past = past  # stop it once it reads a file named after this one (sorted)
        self.reading: list[str] = []
        self.caught = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _capture_pid(self) -> int | None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"restic") and b"backup" in argv and any(b"part:uploads" in a for a in argv):
                return int(pid)
        return None

    def _open_uploads(self, pid: int) -> list[str]:
        found = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(f"{self.folder}/"):
                    found.append(target[len(str(self.folder)) + 1:])
        except OSError:
            pass
        return sorted(found)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                pid = self._capture_pid()
                if pid is None:
                    time.sleep(0.002)
                    continue
                while not self._stop.is_set():
                    open_now = [name for name in self._open_uploads(pid) if (self.folder / name).is_file()]
                    if any(name > self.past for name in open_now):
                        os.kill(pid, signal.SIGSTOP)
                        try:
                            self.reading = self._open_uploads(pid) or open_now
                            self.change(self.reading)
                            self.caught = True
                        finally:
                            os.kill(pid, signal.SIGCONT)
                        return
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.0005)
        except BaseException as error:  # reported by the test
            self.error = error

    def __enter__(self) -> "CaptureInterferer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_files_deleted_modified_and_added_during_the_capture_give_a_set_consistent_with_what_restic_saw(
        pg, tma_db, repo, restic_bin, tmp_path):
    site = make_site(pg, tma_db, tmp_path, repo, n=120, sizes=(400_000, 900_000))
    before = tma_cloud.folder_digests(site.folder)
    paths = site.uploads.paths
    changes: dict[str, Any] = {}

    def change(reading: list[str]) -> None:
        unread = [path for path in paths if path > max(reading)]
        read = [path for path in paths if path < min(reading)]
        assert len(unread) >= 4 and read, (reading, "the capture was caught too late")
        deleted, modified_late, added_name = unread[-1], unread[-2], "ffffffff" + "0" * 24 + ".pdf"
        (site.folder / deleted).unlink()
        for path in [modified_late, *read[:1]]:  # replaced as applications write: a new file renamed over it
            fresh = site.folder / f".{path}.writing"
            fresh.write_bytes(os.urandom((site.folder / path).stat().st_size + 1000))
            os.replace(fresh, site.folder / path)
        tma_cloud.write_blob(site.folder / added_name, 5000)
        changes.update(deleted=deleted, modified=[modified_late, *read[:1]], added=added_name)

    with CaptureInterferer(site.folder, change, past=paths[10]) as interferer:
        result = run_cli(["backup"], site.env, site.cwd)
    assert interferer.error is None, repr(interferer.error)
    assert interferer.caught, "the capture was never caught while reading the uploads"
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    after = tma_cloud.folder_digests(site.folder)
    dump, meta = only_backup(site.backup_dir, tma_db)
    _, uploads_part = set_parts(restic_bin, repo, tma_db, meta.timestamp)
    held = restored_digests(restic_bin, repo, uploads_part["id"], tmp_path / "restored")
    sizes = listing(restic_bin, repo, uploads_part["id"])

    # Every file the set holds is one that existed, whole: its content before or after the change.
    for path, digest in held.items():
        assert digest in {before.get(path), after.get(path)}, f"{path}: neither its old nor its new content"
    untouched = set(paths) - {changes["deleted"], *changes["modified"]}
    assert {path: held.get(path) for path in untouched} == {path: before[path] for path in untouched}
    # The cross-check reports what restic saw.
    recorded = site.uploads.sizes
    expected_missing = sorted(path for path in paths
                              if path not in sizes or sizes[path] not in (recorded[path], recorded[path] + 32))
    extra = meta.extra
    assert json.loads(extra["uploads_missing_names"]) == expected_missing, (changes, extra)
    assert extra["uploads_missing"] == str(len(expected_missing))
    assert extra["uploads_files"] == str(len(held))
    assert extra["uploads_unreferenced"] == str(len(set(held) - set(paths)))
    assert set(json.loads(extra["uploads_unreadable_names"])) <= {changes["deleted"]}
    if expected_missing:
        assert f"[WARN]  {len(expected_missing)} referenced upload(s) missing from the set" in result.stderr

    # Nothing lost: the next run captures the folder as it is now.
    time.sleep(1.1)
    _, _, next_meta = backup(site)
    _, next_part = set_parts(restic_bin, repo, tma_db, next_meta.timestamp)
    assert restored_digests(restic_bin, repo, next_part["id"], tmp_path / "restored-next") == after
    assert next_meta.extra["uploads_unreferenced"] == "1"  # the file added without a row


# ---------------------------------------------------------------------------------------------------
# 7. A fresh machine restores the latest set, through a real worker


def test_a_fresh_machine_restores_database_and_every_upload_from_s3_through_a_worker(
        pg, admin, s3, restic_bin, tma_db, tmp_path):
    """The old machine's worker backs up to S3; a new machine (a new worker, empty BACKUP_DIR, empty
    UPLOAD_DIR, an empty database as TMA Cloud's compose creates it) restores the latest set."""
    repository = restic_init(restic_bin, s3_repository(s3, tmp_path / "restic-cache"))
    site = make_site(pg, tma_db, tmp_path, repository, n=50)
    broker = services.start_redis()
    broker_url = f"redis://127.0.0.1:{broker.port}/0"
    workers: list[services.WorkerProcess] = []

    def start_worker(host: str, env: dict[str, str], cwd: Path) -> services.WorkerProcess:
        worker_env = {**env, "CELERY_BROKER_URL": broker_url, "WORKER_HOST": host, "TEST_CWD": str(cwd)}
        worker = services.WorkerProcess(f"uploads@{host}", worker_env, cwd / f"worker-{host}.log")
        workers.append(worker)
        return worker.start()

    try:
        old = start_worker("host-old", site.env, tmp_path)
        backed_up = run_cli(["backup"], old.env, tmp_path)
        assert backed_up.returncode == 0, backed_up.output
        assert "Cross-check: 50 referenced, 0 missing" in backed_up.stderr, backed_up.output
        dump, meta = only_backup(site.backup_dir, tma_db)
        assert meta.extra["file_encryption_key_sha256"] == KEY_SHA256
        at_backup = digests(pg, tma_db)
        files_at_backup = tma_cloud.folder_digests(site.folder)
        assert len(files_at_backup) == 50
        old.stop()

        # The old machine is gone. The new one: TMA Cloud's compose made an empty database, UPLOAD_DIR is an
        # empty folder, BACKUP_DIR is empty; the operator brought the .env (and so FILE_ENCRYPTION_KEY).
        tma_cloud.drop_database(admin, tma_db)
        tma_cloud.create_database(admin, tma_db)
        fresh = tmp_path / "fresh-machine"
        backups, uploads = fresh / "backups", fresh / "uploads"
        backups.mkdir(parents=True, mode=0o700)
        uploads.mkdir()
        env_file = write_env_file(fresh / "tma-cloud.env", uploads)
        new = start_worker("host-fresh", base_env(pg, backups, DB_NAME=tma_db, TMA_ENV_FILE=str(env_file),
                                                  **repository.settings), fresh)  # DB_NAME: TMA's, as the old one's
        restored = run_cli(["restore", "--from-repository", "latest", "--with-uploads", "--confirm", tma_db],
                           {**new.env, "DB_NAME": tma_db}, fresh)
        assert restored.returncode == 0, restored.output
        assert error_lines(restored.stderr) == []
        assert digests(pg, tma_db) == at_backup
        assert tma_cloud.folder_digests(uploads) == files_at_backup, "every upload, byte for byte"
        assert ours(uploads) == [f".tma-previous-{kept}" for kept in managed_databases(admin, "previous", of=tma_db)]
        assert os.listdir(uploads / ours(uploads)[0]) == [], "the empty folder's (no) files, kept aside"
        fetched, fetched_meta = only_backup(backups, tma_db)
        assert fetched.name == dump.name and fetched_meta.sha256 == meta.sha256
        assert leftovers(backups) == []
        assert "50 files restored" in restored.stderr and "(the current key)" in restored.stderr, restored.output
        # The key: never in the outputs, the workers' logs, the results on the broker, the .metas.
        secret_absent(backed_up.output + restored.output, FILE_KEY, REPOSITORY_PASSWORD)
        for worker in workers:
            secret_absent(worker.log(), FILE_KEY, REPOSITORY_PASSWORD)
        stored = redis_values(redis.Redis.from_url(broker_url))
        assert b"celery-task-meta-" in stored and KEY_SHA256.encode() in stored, "the results are there, with the fingerprint"
        secret_absent(stored, FILE_KEY, REPOSITORY_PASSWORD)
        for path in [*backups.glob("*.meta"), *site.backup_dir.glob("*.meta")]:
            secret_absent(path.read_text(), FILE_KEY)
    finally:
        for worker in workers:
            worker.stop()
        broker.stop()


# ---------------------------------------------------------------------------------------------------
# 8. Restore with uploads, rollback, --uploads-only (UPLOAD_DIR a bind mount, as in compose)


def test_restore_with_uploads_then_rollback_then_uploads_only_on_a_bind_mounted_upload_dir(
        pg, admin, tma_db, repo, restic_bin, tmp_path):
    host_side, mount_point = tmp_path / "host-uploads", tmp_path / "app" / "uploads"
    with bind_mount(host_side, mount_point):
        assert is_mount_point(mount_point)
        site = make_site(pg, tma_db, tmp_path, repo, n=30, upload_dir=mount_point)
        _, dump, _ = backup(site)
        database_a, files_a = digests(pg, tma_db), tma_cloud.folder_digests(mount_point)
        change_site(pg, site)
        database_b, files_b = digests(pg, tma_db), tma_cloud.folder_digests(mount_point)
        assert database_b != database_a and files_b != files_a

        restored = run_cli(["restore", str(dump), "--with-uploads", "--confirm", tma_db], site.env, site.cwd)
        assert restored.returncode == 0, restored.output
        assert digests(pg, tma_db) == database_a
        assert tma_cloud.folder_digests(mount_point) == files_a
        assert is_mount_point(mount_point), "the mount point itself is never renamed"
        assert tma_cloud.folder_digests(host_side) == files_a, "…and the files are on the mounted volume"
        [kept] = managed_databases(admin, "previous", tma_db)
        assert ours(mount_point) == [f".tma-previous-{kept}"]
        assert tma_cloud.folder_digests(mount_point / f".tma-previous-{kept}") == files_b, "the live files, kept"
        assert "the files that were live are kept in" in restored.stderr

        rolled = run_cli(["rollback", "--confirm", tma_db], site.env, site.cwd)
        assert rolled.returncode == 0, rolled.output
        assert digests(pg, tma_db) == database_b
        assert tma_cloud.folder_digests(mount_point) == files_b
        kept_now = managed_databases(admin, "previous")
        assert ours(mount_point) == sorted(f".tma-previous-{name}" for name in kept_now)
        [aside] = ours(mount_point)
        assert tma_cloud.folder_digests(mount_point / aside) == files_a
        assert is_mount_point(mount_point)

        # The uploads disk dies (the kept folders with it); the database is fine and references three
        # uploads made after the backup. --uploads-only brings back every file the set has, names the
        # three it cannot, and leaves the database as it is.
        wipe(mount_point)
        only = run_cli(["restore", str(dump), "--uploads-only", "--confirm", tma_db], site.env, site.cwd)
        assert "Traceback" not in only.output
        assert digests(pg, tma_db) == database_b
        assert managed_databases(admin, "previous") == kept_now, "no database was swapped"
        assert managed_databases(admin, "scratch") == []
        # Issue 12: "`--uploads-only` restores just the files of a set, for the night the uploads disk
        # died and the database is fine": the uploads made since the set are lost, not a reason to
        # restore none of the others.
        assert only.returncode == 0, only.output
        assert tma_cloud.folder_digests(mount_point) == files_a
        lost = sorted(set(files_b) - set(files_a))
        assert len(lost) == 3 and any(all(name in line for name in lost) for line in warn_lines(only.stderr)), only.output
        assert not any(name.startswith(".tma-restore-") or name == ".tma-uploads-swap.json"
                       for name in ours(mount_point))


def wipe(folder: Path) -> None:
    """Everything in `folder` gone (a dead disk, replaced by an empty one mounted at the same place)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def test_uploads_only_brings_back_the_files_of_a_set_and_leaves_the_database_alone(pg, admin, site, tmp_path):
    _, dump, _ = backup(site)
    files = tma_cloud.folder_digests(site.folder)
    with pg.connect(site.database, autocommit=True) as connection:  # the database goes on, without new uploads
        connection.execute("INSERT INTO users (email, name) VALUES ('later@example.com', 'After the backup')")
    database = digests(pg, site.database)
    wipe(site.folder)  # the uploads disk died
    survivor = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.txt"  # something written to the new disk meanwhile
    tma_cloud.write_blob(site.folder / survivor, 10)
    kept_before = managed_databases(admin, "previous")

    only = run_cli(["restore", str(dump), "--uploads-only", "--confirm", site.database], site.env, site.cwd)
    assert only.returncode == 0, only.output
    assert error_lines(only.stderr) == []
    assert tma_cloud.folder_digests(site.folder) == files
    assert digests(pg, site.database) == database
    assert managed_databases(admin, "previous") == kept_before and managed_databases(admin, "scratch") == []
    [aside] = ours(site.folder)
    assert aside.startswith(".tma-previous-") and os.listdir(site.folder / aside) == [survivor], "kept, never deleted"
    assert f"{len(files)} files restored" in only.stderr
