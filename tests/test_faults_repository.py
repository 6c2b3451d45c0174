"""Faults of the off-site repository (issue 11), against a real S3 server (SeaweedFS, stopped and killed
mid-run), real restic, a real PostgreSQL and real Celery worker processes (killed with SIGKILL while
their restic uploads): the repository unreachable before and during the upload, a wrong password,
wrong S3 credentials, no repository at the address, a stale restic lock, a process killed between a
fetch's download and its publication. After each: one clear line for the operator, the local backup
complete and verified, nothing half-written listed in the repository, and the next run sends what was
missed (each set's bytes read back with `restic dump` are the local files'). See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.conftest import _unavailable as unavailable
from tests.conftest import base_env, run_cli
from tests.faults import (
    FaultWorker,
    Stack,
    children_named,
    finished_within,
    kill_worker_and_tools,
    private_stack,
)
from tests.helpers import (
    assert_counts_and_checksum,
    backups_in,
    error_lines,
    leftovers,
    only_backup,
    settings_for,
    sha256_file,
    wait_for,
)
from tests.s3_server import S3Server, start_s3
from tests.test_restore import digests
from worker.archive import catalogue
from worker.archive.meta import read_meta
from worker.repository.lock import repository_lock

PASSWORD = "Repo-Pw-For-Fault-Tests-5d2e"
STALL_TIMEOUT = 5  # REPOSITORY_STALL_TIMEOUT: restic killed after this long of nothing but retries
LOCK_TIMEOUT = 6  # BACKUP_LOCK_TIMEOUT, as in tests/test_faults_backup.py
BIG_MEGABYTES = 40  # random rows: with the uplink at UPLINK_KIB_S, an upload of about five seconds
UPLINK_KIB_S = 8192  # restic --limit-upload while a test slows the uplink down
LISTING_DELAY = 3  # seconds a slowed `restic snapshots` waits before it starts


# ---------------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Repository:
    """One restic repository in a bucket (and folder) of its own, read from outside tma-backup: raw
    restic (`--no-lock`, so the inspection never adds a lock of its own) and boto3."""

    server: S3Server
    bucket: str
    prefix: str
    cache: Path
    password: str = PASSWORD

    @property
    def address(self) -> str:
        return self.server.url(self.bucket, self.prefix)

    def settings(self, **overrides: str) -> dict[str, str]:
        """tma-backup's settings for it."""
        return {"BACKUP_REPOSITORY": self.address, "BACKUP_REPOSITORY_PASSWORD": self.password,
                "REPOSITORY_STALL_TIMEOUT": str(STALL_TIMEOUT), **self.server.env(), **overrides}

    def restic_env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.cache),
                "RESTIC_CACHE_DIR": str(self.cache), "RESTIC_REPOSITORY": self.address,
                "RESTIC_PASSWORD": self.password, **self.server.aws_env()}

    def restic(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(["restic", "--no-lock", *args], env=self.restic_env(), capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=120)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result

    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot in the repository, tagged by us or not."""
        return json.loads(self.restic("snapshots", "--json").stdout or b"[]") or []

    def sha256_of(self, snapshot: str, name: str) -> str:
        """SHA-256 of file `name` of a set, as `restic dump` gives it back."""
        process = subprocess.Popen(["restic", "--no-lock", "dump", snapshot, "/" + name], env=self.restic_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        digest = hashlib.sha256()
        assert process.stdout is not None
        for block in iter(lambda: process.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
            digest.update(block)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode(errors="replace")
        return digest.hexdigest()

    def objects(self, under: str = "") -> dict[str, int]:
        """Every object of the repository's bucket under its folder (+ `under`): key → size."""
        client = self.server.client()
        prefix = "/".join(part for part in (self.prefix.strip("/"), under) if part)
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def locks(self) -> list[str]:
        """The restic lock files in the repository."""
        return sorted(key.rsplit("/", 1)[-1] for key in self.objects("locks/"))

    def data_packs(self) -> int:
        return len(self.objects("data/"))

    def buckets(self) -> set[str]:
        return {entry["Name"] for entry in self.server.client().list_buckets()["Buckets"]}


class SlowRestic:
    """A `restic` first on PATH that runs the machine's restic, slower while a switch file exists: with
    `slow-uplink`, uploads limited to UPLINK_KIB_S (`--limit-upload`: an off-site uplink, so that a test
    can act while an upload is under way without a database of gigabytes); with `slow-listing`,
    `restic snapshots` starts LISTING_DELAY seconds late (a far server holding many sets). It `exec`s
    restic: the process tma-backup started is restic itself, with its PR_SET_PDEATHSIG."""

    def __init__(self, folder: Path, restic_bin: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "restic"
        script.write_text(
            "#!/bin/sh\n"
            'here=$(dirname "$0")\n'
            f'if [ -e "$here/slow-listing" ] && [ "$1" = snapshots ]; then sleep {LISTING_DELAY}; fi\n'
            f'if [ -e "$here/slow-uplink" ]; then exec {restic_bin} --limit-upload {UPLINK_KIB_S} "$@"; fi\n'
            f'exec {restic_bin} "$@"\n')
        script.chmod(0o755)

    @property
    def path(self) -> str:
        """PATH for tma-backup's processes: this folder first."""
        return f"{self.folder}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def switch(self, name: str, on: bool) -> None:
        (self.folder / name).touch() if on else (self.folder / name).unlink(missing_ok=True)


def new_repository(server: S3Server, tmp_path: Path) -> Repository:
    cache = tmp_path / "restic-cache"
    cache.mkdir(exist_ok=True)
    return Repository(server, f"tma-faults-{uuid.uuid4().hex[:10]}", "offsite", cache)


def init(repository: Repository) -> None:
    """Create the repository with restic itself: its creation is not what these tests are about (and
    `tma-backup repository init` is tests/test_repository.py's)."""
    repository.restic("init")


def listed_sets(env: dict[str, str], cwd: Path, database: str) -> list[dict[str, Any]]:
    """The sets of `database` as `tma-backup repository list --json` shows them."""
    result = run_cli(["repository", "list", "--database", database, "--json"], env, cwd, timeout=60)
    assert result.returncode == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def assert_every_backup_sent(repository: Repository, env: dict[str, str], cwd: Path, backup_dir: Path,
                             database: str, expected: int) -> None:
    """`expected` complete local backups, each one set (no other), whose dump and .meta read back with
    `restic dump` have the local files' SHA-256."""
    local = {read_meta(catalogue.meta_path(dump)).timestamp: dump for dump in backups_in(backup_dir, database)}
    assert len(local) == expected, sorted(local)
    sets = listed_sets(env, cwd, database)
    assert sorted(found["timestamp"] for found in sets) == sorted(local), (sets, sorted(local))
    assert len(repository.snapshots()) == expected, "no snapshot besides the sets"
    for found in sets:
        dump = local[found["timestamp"]]
        meta = catalogue.meta_path(dump)
        assert found["files"] == sorted([dump.name, meta.name]), found
        assert repository.sha256_of(found["id"], dump.name) == sha256_file(dump)
        assert repository.sha256_of(found["id"], meta.name) == sha256_file(meta)
        assert read_meta(meta).sha256 == sha256_file(dump)


def date_a_day_earlier(dump: Path) -> str:
    """Make a backup yesterday's: its name and its `.meta`'s timestamp a day earlier, nothing else (its
    bytes, checksum and counts stay as they are). The outage then spans midnight, as a real one does, and
    calendar retention (REPOSITORY_KEEP_DAILY: one set per day) keeps both the caught-up set and the
    next run's; two sets of one day would leave only the newer. Returns the new timestamp."""
    meta = catalogue.meta_path(dump)
    old = read_meta(meta).timestamp
    new = (catalogue.parse_timestamp(old) - timedelta(days=1)).strftime(catalogue.TIMESTAMP_FORMAT)
    text = meta.read_text()
    assert text.startswith(f"timestamp={old}\n"), text[:100]
    moved = dump.with_name(dump.name.replace(old, new))
    os.rename(dump, moved)
    descriptor = os.open(catalogue.meta_path(moved), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text.replace(f"timestamp={old}\n", f"timestamp={new}\n", 1))
    meta.unlink()
    return new


def assert_local_backup_complete(backup_dir: Path, database: str, env: dict[str, str], cwd: Path) -> Path:
    """`database` has exactly one backup, complete (its `.dump` and `.meta`), `tma-backup verify` (run
    here, without a broker) passes, and no scratch file is left. Returns the dump."""
    dump, _ = only_backup(backup_dir, database)
    checked = run_cli(["verify", str(dump)], {**env, "CELERY_BROKER_URL": ""}, cwd, timeout=120)
    assert checked.returncode == 0, checked.output
    assert leftovers(backup_dir) == []
    return dump


def assert_one_clean_error(output: str, *secrets: str) -> str:
    [line] = error_lines(output)
    assert "Traceback" not in output, output
    for secret in secrets:
        assert secret not in output, "a secret reached the operator's terminal"
    return line


def add_random_blobs(pg: services.PostgresServer, database: str, megabytes: int) -> None:
    """A table of incompressible rows (1 MiB each, all different), so that an upload takes seconds."""
    with pg.connect(database, autocommit=True) as connection:
        connection.execute("CREATE TABLE blobs (id serial PRIMARY KEY, content bytea)")
        connection.execute("ALTER TABLE blobs ALTER content SET STORAGE EXTERNAL")  # no futile compression
        connection.execute(
            "INSERT INTO blobs (content) SELECT (SELECT string_agg(gen_random_bytes(1024), ''::bytea)"
            " FROM generate_series(1, 1024) WHERE g > 0) FROM generate_series(1, %s) g", (megabytes,))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def uploading_restic(worker: FaultWorker, repository: Repository) -> list[int]:
    """The worker's `restic backup` while its first data pack is in the bucket: the upload is under way."""
    backups = [pid for pid in children_named(worker.pids(), "restic") if "backup" in argv_of(pid)[1:4]]
    return backups if backups and repository.data_packs() > 0 else []


def repository_lock_holder(env: dict[str, str]) -> str | None:
    return repository_lock(settings_for(env), f"probe-{uuid.uuid4()}").holder()


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A private S3 server that this test may stop and kill (the session's `s3` stays up)."""
    try:
        server = start_s3(tmp_path / "s3")
    except services.ServiceUnavailable as error:
        unavailable(str(error))
    yield server
    server.kill()


@pytest.fixture
def repository(s3: S3Server, restic_bin: str, tmp_path: Path) -> Repository:
    """A fresh bucket in the session's S3 server (not initialised: the test decides)."""
    return new_repository(s3, tmp_path)


@pytest.fixture
def local_env(pg: services.PostgresServer, backup_dir: Path, tma_db: str, repository: Repository) -> dict[str, str]:
    """In-process runs (no broker) with the session's S3 as BACKUP_REPOSITORY."""
    return base_env(pg, backup_dir, DB_NAME=tma_db, **repository.settings())


# ---------------------------------------------------------------------------------------------------
# The repository unreachable


def test_s3_down_before_the_offsite_link_fails_the_run_keeps_the_local_backup_and_the_next_run_sends_both(
        own_s3, restic_bin, pg, tma_db, backup_dir, tmp_path):
    """S3 stopped before the run: the offsite link fails at once with one line (`cannot reach the
    repository`), the backup stays complete locally and verifies; with S3 back, the next run sends the
    missed backup and its own, two sets, byte for byte the local files."""
    repository = new_repository(own_s3, tmp_path)
    env = base_env(pg, backup_dir, DB_NAME=tma_db, **repository.settings())
    init(repository)
    own_s3.stop()
    try:
        started = time.monotonic()
        result = run_cli(["backup"], env, tmp_path, timeout=120)
        took = time.monotonic() - started
        assert result.returncode == 1, result.output
        line = assert_one_clean_error(result.output, PASSWORD, own_s3.secret_key)
        assert "cannot reach the repository" in line, line
        assert took < STALL_TIMEOUT + 30, f"failed after {took:.0f} s"
        assert_counts_and_checksum(pg, backup_dir, tma_db)
        missed = assert_local_backup_complete(backup_dir, tma_db, env, tmp_path)
    finally:
        own_s3.start()
    assert repository.snapshots() == []

    yesterday = date_a_day_earlier(missed)
    # (the run that must succeed gets a stall timeout a busy machine cannot reach: a restarted server
    # under a parallel test run may be silent for more than 5 s, and this run is no test of the watchdog)
    result = run_cli(["backup"], {**env, "REPOSITORY_STALL_TIMEOUT": "120"}, tmp_path, timeout=300)
    assert result.returncode == 0, result.output
    assert f"also sent the backup of {yesterday}" in result.output, result.output
    assert_every_backup_sent(repository, env, tmp_path, backup_dir, tma_db, expected=2)
    assert repository.locks() == []


def test_the_next_run_sends_a_missed_backup_even_when_its_listing_ends_after_its_own_upload(
        repository, local_env, tma_db, backup_dir, tmp_path, restic_bin):
    """The next run sends every local backup newer than the repository's newest set before it ran. Its
    listing of the sets runs beside the upload of its own backup; against a far server with many sets
    (here: `restic snapshots` delayed 3 s) the listing ends after its own set is written, and must not
    take that set for the newest one and so leave the missed backup unsent for good. (The first run's
    offsite fails on a wrong password: the cheapest failed offsite.)"""
    init(repository)
    slow = SlowRestic(tmp_path / "bin", restic_bin)
    env = {**local_env, "PATH": slow.path}
    failed = run_cli(["backup"], {**env, "BACKUP_REPOSITORY_PASSWORD": "Not-The-Repo-Pw-0a9b"}, tmp_path, timeout=120)
    assert failed.returncode == 1, failed.output
    yesterday = date_a_day_earlier(only_backup(backup_dir, tma_db)[0])

    slow.switch("slow-listing", True)
    result = run_cli(["backup"], env, tmp_path, timeout=120)
    slow.switch("slow-listing", False)
    assert result.returncode == 0, result.output
    assert f"also sent the backup of {yesterday}" in result.output, result.output
    assert_every_backup_sent(repository, env, tmp_path, backup_dir, tma_db, expected=2)


@contextmanager
def slow_upload_stack(server: S3Server, restic_bin: str, pg: services.PostgresServer, tma_db: str,
                      tmp_path: Path) -> Iterator[tuple[Repository, SlowRestic, Stack]]:
    """A private stack (no worker yet) whose restic can be slowed, an initialised repository on
    `server`, and a database big enough (BIG_MEGABYTES of random blobs, not compressed) that an upload
    lasts seconds when slowed."""
    repository = new_repository(server, tmp_path)
    slow = SlowRestic(tmp_path / "bin", restic_bin)
    add_random_blobs(pg, tma_db, BIG_MEGABYTES)
    with private_stack(pg, tma_db, tmp_path, BACKUP_LOCK_TIMEOUT=str(LOCK_TIMEOUT), BACKUP_COMPRESSION="0",
                       PATH=slow.path, **repository.settings()) as stack:
        init(repository)
        yield repository, slow, stack


def test_s3_killed_during_the_upload_fails_in_bounded_time_lists_no_set_and_the_next_run_sends_both(
        own_s3, restic_bin, pg, tma_db, tmp_path):
    """Through a real worker: S3 killed (SIGKILL) while `restic backup` uploads (the uplink slowed to
    8 MiB/s, so the upload lasts seconds). restic would retry for many minutes; it is stopped after
    REPOSITORY_STALL_TIMEOUT and the follower prints one line. Once S3 is back: no snapshot at all (restic
    writes it last), the local backup complete; the next run sends both, and the killed restic's stale
    lock is gone."""
    with slow_upload_stack(own_s3, restic_bin, pg, tma_db, tmp_path) as (repository, slow, stack):
        worker = stack.start_worker()
        slow.switch("slow-uplink", True)
        follower = stack.start_backup()
        try:
            wait_for(lambda: uploading_restic(worker, repository), timeout=120, interval=0.05,
                     what="restic to upload the backup")
            own_s3.kill()
            killed_at = time.monotonic()
            _, stderr = finished_within(follower, STALL_TIMEOUT + 25)
            took = time.monotonic() - killed_at
        finally:
            follower.kill()
            slow.switch("slow-uplink", False)
            own_s3.start()
        assert follower.returncode == 1, stderr
        line = assert_one_clean_error(stderr, PASSWORD, own_s3.secret_key)
        assert "cannot reach the repository" in line, line
        assert took >= STALL_TIMEOUT - 1, f"gave up {took:.1f} s after the kill, before REPOSITORY_STALL_TIMEOUT"
        assert PASSWORD not in worker.log() and own_s3.secret_key not in worker.log()
        assert repository.snapshots() == [], "an interrupted upload is no set"
        assert listed_sets(stack.env, tmp_path, tma_db) == []
        missed = assert_local_backup_complete(stack.backups, tma_db, stack.env, tmp_path)
        assert stack.lock_holder() is None, "the error callback released the database's lock"
        assert repository.locks(), "the killed restic's lock is left in the repository"

        yesterday = date_a_day_earlier(missed)
        result = run_cli(["backup"], stack.env, tmp_path, timeout=300)
        assert result.returncode == 0, result.output + worker.log()[-3000:]
        assert f"also sent the backup of {yesterday}" in result.output, result.output
        assert_every_backup_sent(repository, stack.env, tmp_path, stack.backups, tma_db, expected=2)
        assert repository.locks() == [], "the killed restic's lock was removed"


# ---------------------------------------------------------------------------------------------------
# Wrong password, wrong credentials, no repository


def test_a_wrong_repository_password_fails_with_one_line_and_adds_nothing(
        repository, local_env, pg, tma_db, backup_dir, tmp_path):
    init(repository)
    before = repository.objects()
    wrong = "Not-The-Repo-Pw-0a9b"
    env = {**local_env, "BACKUP_REPOSITORY_PASSWORD": wrong}
    result = run_cli(["backup"], env, tmp_path, timeout=120)
    assert result.returncode == 1, result.output
    line = assert_one_clean_error(result.output, wrong, PASSWORD, repository.server.secret_key)
    assert "refused the password" in line, line
    assert_counts_and_checksum(pg, backup_dir, tma_db)
    assert_local_backup_complete(backup_dir, tma_db, env, tmp_path)
    assert repository.objects() == before, "nothing was added to the repository"


@pytest.mark.parametrize("what", ["secret key", "access key"])
def test_wrong_s3_credentials_fail_with_one_line_about_them_and_add_nothing(
        what, repository, local_env, pg, tma_db, backup_dir, tmp_path):
    init(repository)
    before = repository.objects()
    if what == "secret key":
        wrong = repository.server.secret_key[::-1]
        env = {**local_env, "BACKUP_REPOSITORY_SECRET_ACCESS_KEY": wrong}
    else:
        wrong = f"tma-unknown-{uuid.uuid4().hex[:8]}"
        env = {**local_env, "BACKUP_REPOSITORY_ACCESS_KEY_ID": wrong}
    result = run_cli(["backup"], env, tmp_path, timeout=120)
    assert result.returncode == 1, result.output
    line = assert_one_clean_error(result.output, PASSWORD, repository.server.secret_key, wrong)
    assert "refused the credentials" in line and "BACKUP_REPOSITORY_ACCESS_KEY_ID" in line, line
    assert_local_backup_complete(backup_dir, tma_db, env, tmp_path)
    assert repository.objects() == before, "nothing was added to the repository"


def test_no_repository_at_the_address_says_to_run_init_and_creates_nothing(
        repository, pg, tma_db, backup_dir, tmp_path):
    """A local path that does not exist, an S3 bucket that does not exist, an existing bucket with no
    repository in the folder named: one line that says to run `tma-backup repository init`, exit 1, the
    local backup complete, and nothing created (only `repository init` ever creates a repository)."""
    missing_path = tmp_path / "nowhere" / "repository"
    client = repository.server.client()
    client.create_bucket(Bucket=repository.bucket)  # exists, but nothing under repository.prefix
    absent_bucket = f"tma-faults-absent-{uuid.uuid4().hex[:8]}"
    cases = {
        "local path": missing_path.as_posix(),
        "absent bucket": repository.server.url(absent_bucket, "offsite"),
        "empty folder of a bucket": repository.address,
    }
    for number, (case, address) in enumerate(cases.items(), 1):
        env = base_env(pg, backup_dir, DB_NAME=tma_db, **repository.settings(BACKUP_REPOSITORY=address))
        result = run_cli(["backup"], env, tmp_path, timeout=120)
        assert result.returncode == 1, (case, result.output)
        line = assert_one_clean_error(result.output, PASSWORD, repository.server.secret_key)
        assert "no restic repository at" in line and "tma-backup repository init" in line, (case, line)
        assert len(backups_in(backup_dir, tma_db)) == number, case
        assert leftovers(backup_dir) == [], case
    assert not missing_path.exists() and not missing_path.parent.exists(), "no folder was created"
    assert absent_bucket not in repository.buckets(), "no bucket was created"
    assert repository.objects() == {}, "nothing was written into the bucket"
    checked = run_cli(["verify", str(backups_in(backup_dir, tma_db)[-1])], env, tmp_path)
    assert checked.returncode == 0, checked.output


# ---------------------------------------------------------------------------------------------------
# Stale restic locks, killed workers


def test_a_stale_exclusive_restic_lock_is_removed_and_the_backup_is_sent(
        repository, local_env, tma_db, backup_dir, tmp_path):
    """A restic process killed while it held the repository's exclusive lock (as a killed `prune` or
    `check` leaves it; here `restic key passwd`, which holds it while it waits for a new password, so
    the kill is not a race): restic refuses every command while that lock is there. The next backup
    removes it (`restic unlock`: its process is gone) and sends its set."""
    init(repository)
    holder = subprocess.Popen(["restic", "key", "passwd"], env=repository.restic_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        [stale] = wait_for(repository.locks, timeout=30, interval=0.05, what="restic's exclusive lock")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = json.loads(repository.restic("cat", "lock", stale).stdout)
    assert lock["exclusive"] is True and lock["pid"] == holder.pid, lock
    refused = subprocess.run(["restic", "snapshots"], env=repository.restic_env(), capture_output=True, text=True)
    assert refused.returncode != 0 and "locked exclusively" in refused.stderr, "the stale lock is in the way"

    result = run_cli(["backup"], local_env, tmp_path, timeout=120)
    assert result.returncode == 0, result.output
    assert repository.locks() == [], "the stale lock is gone, and the run left none"
    assert_every_backup_sent(repository, local_env, tmp_path, backup_dir, tma_db, expected=1)


def test_a_worker_killed_during_the_upload_takes_restic_with_it_frees_both_locks_and_the_next_run_sends_it(
        s3, restic_bin, pg, tma_db, tmp_path):
    """SIGKILL of the worker (main and pool processes) while its `restic backup` uploads: restic, in a
    session of its own, dies with the pool process (PR_SET_PDEATHSIG); restic had written no snapshot,
    so no set is listed; the backup is complete locally (offsite runs after meta); the database's and
    the repository's locks are free within BACKUP_LOCK_TIMEOUT; the killed restic's lock stays in the
    repository until the next run, on a new worker, removes it and sends the backup with its own."""
    with slow_upload_stack(s3, restic_bin, pg, tma_db, tmp_path) as (repository, slow, stack):
        worker = stack.start_worker()
        slow.switch("slow-uplink", True)
        follower = stack.start_backup()
        try:
            tools = wait_for(lambda: uploading_restic(worker, repository), timeout=120, interval=0.05,
                             what="restic to upload the backup")
            tools = sorted({*tools, *children_named(worker.pids(), "restic")})
            assert stack.lock_holder() and repository_lock_holder(stack.env), "the run holds both locks"
            kill_worker_and_tools(worker)  # not restic: it runs in a session of its own
            killed_at = time.monotonic()
            wait_for(lambda: not any(alive(pid) for pid in tools), timeout=5, interval=0.05,
                     what=f"restic {tools} to die with the worker")
            wait_for(lambda: stack.lock_holder() is None and repository_lock_holder(stack.env) is None,
                     timeout=LOCK_TIMEOUT + 10, interval=0.05, what="the dead run's locks to expire")
            freed_after = time.monotonic() - killed_at
            _, stderr = finished_within(follower, LOCK_TIMEOUT * 3 + 10)
        finally:
            follower.kill()
            slow.switch("slow-uplink", False)
        assert freed_after <= LOCK_TIMEOUT + 1, f"locks freed {freed_after:.1f}s after the kill"
        assert follower.returncode == 1 and "lost track" in assert_one_clean_error(stderr, PASSWORD), stderr
        assert repository.snapshots() == [], "an interrupted upload is no set"
        assert listed_sets(stack.env, tmp_path, tma_db) == []
        assert_local_backup_complete(stack.backups, tma_db, stack.env, tmp_path)
        stale = repository.locks()
        assert stale, "the killed restic's lock is left in the repository"

        yesterday = date_a_day_earlier(only_backup(stack.backups, tma_db)[0])
        stack.start_worker()
        result = run_cli(["backup"], stack.env, tmp_path, timeout=300)
        assert result.returncode == 0, result.output
        assert f"also sent the backup of {yesterday}" in result.output, result.output
        assert_every_backup_sent(repository, stack.env, tmp_path, stack.backups, tma_db, expected=2)
        assert repository.locks() == [], f"the stale lock {stale} is gone"


# ---------------------------------------------------------------------------------------------------
# Fetch


def test_killed_between_a_fetch_and_its_publication_leaves_nothing_complete_looking_and_the_live_database_alone(
        repository, local_env, pg, admin, tma_db, backup_dir, tmp_path):
    """`tma-backup restore --from-repository latest` on a fresh machine (an empty BACKUP_DIR), SIGKILLed
    after the download was checked and before it was published (TMA_BACKUP_CRASH_AT=fetch:publish): only
    the fetch's staging folder is left, holding the download (no `.dump`, no `.meta`, no `.partial` in
    BACKUP_DIR: nothing looks like a backup, nothing a prune would take for a run's leftover), the live
    database and the server's databases are unchanged; run again, the fetch and the restore succeed and
    the staging folder is gone."""
    init(repository)
    assert run_cli(["backup"], local_env, tmp_path, timeout=120).returncode == 0
    original, meta = only_backup(backup_dir, tma_db)
    at_backup = digests(pg, tma_db)
    with pg.connect(tma_db, autocommit=True) as connection:
        connection.execute("INSERT INTO users (email, name) VALUES ('after@example.com', 'Added after the backup')")
    live = digests(pg, tma_db)
    assert live != at_backup
    databases = {row[0] for row in admin.execute("SELECT datname FROM pg_database")}

    fresh = tmp_path / "fresh-machine"
    fresh.mkdir(mode=0o700)
    env = {**local_env, "BACKUP_DIR": str(fresh)}
    argv = ["restore", "--from-repository", "latest", "--confirm", tma_db]
    crashed = run_cli(argv, {**env, "TMA_BACKUP_CRASH_AT": "fetch:publish"}, tmp_path, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.output
    names = sorted(path.name for path in fresh.iterdir())
    [staging] = [name for name in names if name.startswith(".fetch-")]
    assert not [name for name in names if name.endswith((".dump", ".dump.zst", ".meta", ".partial"))], names
    assert [entry for entry in catalogue.list_backups(fresh, tma_db)] == []
    assert os.path.getsize(fresh / staging / original.name) == meta.file_size_bytes, "killed after the download"
    assert digests(pg, tma_db) == live, "the live database is unchanged"
    assert {row[0] for row in admin.execute("SELECT datname FROM pg_database")} == databases

    result = run_cli(argv, env, tmp_path, timeout=180)
    assert result.returncode == 0, result.output
    fetched, fetched_meta = only_backup(fresh, tma_db)
    assert fetched.name == original.name and sha256_file(fetched) == sha256_file(original) == fetched_meta.sha256
    assert leftovers(fresh) == []
    assert not (fresh / staging).exists()
    assert digests(pg, tma_db) == at_backup, "restored: the backup's content"
