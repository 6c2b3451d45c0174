"""The off-site restic repository (issue 11) against real things: a SeaweedFS S3 server (the `s3`
fixture), local-path repositories, the real `restic`, the session's PostgreSQL and real Celery workers.

Every repository is a fresh bucket (or folder) of its own. The tests read the repository back with the
plain `restic` CLI, given only its environment, as an operator would on the night tma-backup is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from tests import services, tma_cloud
from tests.conftest import TEST_PASSWORD, base_env, run_cli
from tests.faults import tmpfs
from tests.helpers import (
    PsSampler,
    assert_counts_and_checksum,
    backups_in,
    error_lines,
    leftovers,
    only_backup,
    settings_for,
    sha256_file,
)
from tests.s3_server import S3Server
from tests.test_restore import change_live, digests, managed_databases
from tests.test_workers import client_app
from worker.archive import catalogue
from worker.archive.compression import is_compressed
from worker.archive.meta import human_size, read_meta
from worker.repository import handover
from worker.repository import offsite as offsite_module
from worker.repository.maintenance import forget
from worker.repository.offsite import SentSet, send
from worker.repository.restic import Restic

# Distinctive, so that a search for them in argv, logs, results and files cannot match by accident.
REPOSITORY_PASSWORD = "Repo-Pw-For-Tests-7c3e91d4aa"
WRONG_PASSWORD = "Wrong-Repo-Pw-For-Tests-5be0c2"
REDIS_DB = 15  # the session Redis's database for this module's workers (others use 0, 3-14)
# REPOSITORY_STALL_TIMEOUT. Not a few seconds: restic 0.14 also "retries" (for up to about a minute) a
# lock file that another restic process removed between listing and loading it, which is no dead server.
STALL_TIMEOUT = "120"


@dataclass
class Repository:
    address: str
    settings: dict[str, str]  # what tma-backup is given
    restic_env: dict[str, str]  # what a bare `restic` is given
    bucket: str | None = None


def s3_repository(s3: S3Server, cache: Path, password: str = REPOSITORY_PASSWORD) -> Repository:
    bucket = f"tma-repo-{uuid.uuid4().hex[:10]}"
    address = s3.url(bucket, "sets")
    settings = {"BACKUP_REPOSITORY": address, "BACKUP_REPOSITORY_PASSWORD": password,
                "REPOSITORY_STALL_TIMEOUT": STALL_TIMEOUT, **s3.env()}
    return Repository(address, settings, _restic_env(address, password, cache, s3.aws_env()), bucket)


def local_repository(path: Path, cache: Path, password: str = REPOSITORY_PASSWORD) -> Repository:
    settings = {"BACKUP_REPOSITORY": str(path), "BACKUP_REPOSITORY_PASSWORD": password,
                "REPOSITORY_STALL_TIMEOUT": STALL_TIMEOUT}
    return Repository(str(path), settings, _restic_env(str(path), password, cache, {}))


def _restic_env(address: str, password: str, cache: Path, aws: dict[str, str]) -> dict[str, str]:
    cache.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cache), "RESTIC_CACHE_DIR": str(cache),
            "RESTIC_REPOSITORY": address, "RESTIC_PASSWORD": password, **aws}


def restic(restic_bin: str, repository: Repository, *args: str, binary: bool = False,
           check: bool = True) -> subprocess.CompletedProcess[Any]:
    """The plain restic CLI with the repository's environment and nothing else."""
    result = subprocess.run([restic_bin, *args], env=repository.restic_env, capture_output=True, text=not binary,
                            stdin=subprocess.DEVNULL, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def restic_init(restic_bin: str, repository: Repository) -> Repository:
    restic(restic_bin, repository, "init")
    return repository


def snapshots(restic_bin: str, repository: Repository) -> list[dict[str, Any]]:
    return json.loads(restic(restic_bin, repository, "snapshots", "--json").stdout or "[]")


def tag_value(snapshot: dict[str, Any], prefix: str) -> str | None:
    found = [tag[len(prefix):] for tag in snapshot.get("tags") or [] if tag.startswith(prefix)]
    assert len(found) <= 1, snapshot
    return found[0] if found else None


def listed_files(restic_bin: str, repository: Repository, snapshot: str) -> dict[str, int]:
    """Every node of a set (`restic ls`): path → size, for files; a folder would show as size -1."""
    nodes = {}
    for line in restic(restic_bin, repository, "ls", "--json", snapshot).stdout.splitlines():
        node = json.loads(line)
        if node.get("struct_type") == "node":
            nodes[node["path"]] = node.get("size", -1) if node.get("type") == "file" else -1
    return nodes


def dumped(restic_bin: str, repository: Repository, snapshot: str, name: str) -> bytes:
    return restic(restic_bin, repository, "dump", snapshot, "/" + name, binary=True).stdout


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def our_sets(restic_bin: str, repository: Repository, database: str) -> list[dict[str, Any]]:
    """The snapshots tagged as this tool's sets of `database`, oldest backup first."""
    found = [snapshot for snapshot in snapshots(restic_bin, repository)
             if "tma-backup" in (snapshot.get("tags") or []) and tag_value(snapshot, "db:") == database]
    return sorted(found, key=lambda snapshot: tag_value(snapshot, "at:") or "")


def assert_set_holds(restic_bin: str, repository: Repository, snapshot: dict[str, Any], dump: Path) -> None:
    """The set holds exactly `dump` and its `.meta` at its root, byte for byte, and the dump's bytes are
    the SHA-256 its `.meta` records."""
    meta = catalogue.meta_path(dump)
    assert listed_files(restic_bin, repository, snapshot["id"]) == {
        f"/{dump.name}": dump.stat().st_size, f"/{meta.name}": meta.stat().st_size}
    recorded = catalogue.inspect_backup(dump, tag_value(snapshot, "db:") or "", tag_value(snapshot, "at:") or "").meta
    assert recorded is not None
    assert sha256(dumped(restic_bin, repository, snapshot["id"], dump.name)) == sha256_file(dump) == recorded.sha256
    assert dumped(restic_bin, repository, snapshot["id"], meta.name) == meta.read_bytes()


def timestamp_of(dump: Path, database: str) -> str:
    return catalogue.timestamp_of(dump, database)


def craft(source: Path, database: str, directory: Path, timestamp: str, tamper: bool = False) -> Path:
    """A copy of backup `source` as if taken at `timestamp` (the `.meta`'s timestamp rewritten; its
    SHA-256 stays valid as the dump's bytes are the same), in `directory`. `tamper` flips one byte of
    the dump and keeps the `.meta`: a copy whose bytes are not what its `.meta` records."""
    directory.mkdir(mode=0o700, exist_ok=True)
    target = directory / catalogue.backup_name(database, timestamp)
    data = bytearray(source.read_bytes())
    if tamper:
        data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    lines = catalogue.meta_path(source).read_text().split("\n")
    rewritten = [f"timestamp={timestamp}" if line.startswith("timestamp=") else line for line in lines]
    catalogue.meta_path(target).write_text("\n".join(rewritten))
    entry = catalogue.inspect_backup(target, database, timestamp)
    assert entry.complete, entry.problem
    return target


def send_crafted(env: dict[str, str], dump: Path, database: str) -> SentSet:
    """Send one local backup as a set, with the offsite link's own `send` and the settings `env` gives."""
    settings = settings_for(env)
    entry = catalogue.inspect_backup(dump, database, timestamp_of(dump, database))
    return send(Restic(settings), entry, f"test-{uuid.uuid4()}", settings.WORKER_HOST, None)  # its .meta's server


def made_on(dump: Path) -> str:
    """The server a backup was taken from, as its .meta records it (`pg-<system_identifier>`)."""
    return read_meta(catalogue.meta_path(dump)).extra["server_id"]


def moment(days_ago: float = 0, hours: float = 0) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_ago, hours=hours)).strftime(catalogue.TIMESTAMP_FORMAT)


def secrets_absent(text: str | bytes, *secrets: str) -> None:
    haystack = text.decode(errors="replace") if isinstance(text, bytes) else text
    for secret in secrets:
        assert secret not in haystack, f"a secret ({secret[:4]}…) appears"


def redis_values(client: redis.Redis) -> bytes:
    """Every key and value in this Redis database, whatever its type."""
    stored = []
    for key in client.keys("*"):
        kind = client.type(key)
        stored.append(key)
        if kind == b"string":
            stored.append(client.get(key) or b"")
        elif kind == b"list":
            stored += client.lrange(key, 0, -1)
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                stored += [field, value]
        elif kind == b"set":
            stored += list(client.smembers(key))
        elif kind == b"zset":
            stored += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
    return b"\n".join(stored)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "restic-cache"


@pytest.fixture
def repo(s3: S3Server, restic_bin: str, cache: Path) -> Repository:
    """A fresh, initialised repository in a bucket of its own."""
    return restic_init(restic_bin, s3_repository(s3, cache))


@pytest.fixture
def env(pg: services.PostgresServer, backup_dir: Path, tma_db: str, repo: Repository) -> dict[str, str]:
    """In-process (no broker) against the test database, with the repository."""
    return base_env(pg, backup_dir, DB_NAME=tma_db, **repo.settings)


@pytest.fixture
def start_worker(pg: services.PostgresServer, redis_server: services.RedisServer, tmp_path: Path):
    """Start real workers (`celery -A worker worker`) on this module's Redis database, emptied first."""
    broker = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    started: list[services.WorkerProcess] = []

    def start(backup_dir: Path, host: str, **settings: str) -> services.WorkerProcess:
        worker_env = base_env(pg, backup_dir, CELERY_BROKER_URL=broker, WORKER_HOST=host, TEST_CWD=str(tmp_path),
                              **settings)
        worker = services.WorkerProcess(f"repo@{host}", worker_env, tmp_path / f"worker-{host}.log")
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def backup_in_process(env: dict[str, str], cwd: Path) -> tuple[Any, Path]:
    result = run_cli(["backup"], env, cwd)
    assert result.returncode == 0, result.output
    return result, only_backup(Path(env["BACKUP_DIR"]), env["DB_NAME"])[0]


def drop_kept_copies(admin: Any) -> None:
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


# ---------------------------------------------------------------------------------------------------
# 1-3: never implicit; init; one backup, one set


@pytest.mark.parametrize("kind", ["local path", "s3 bucket"])
def test_a_backup_never_creates_the_repository_and_stays_complete_locally(
        kind, pg, s3, backup_dir, tma_db, cache, tmp_path):
    if kind == "local path":
        target = tmp_path / "offsite" / "repository"
        (tmp_path / "offsite").mkdir()
        repository = local_repository(target, cache)
    else:
        repository = s3_repository(s3, cache)
    env = base_env(pg, backup_dir, DB_NAME=tma_db, **repository.settings)
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 1, result.output
    [line] = error_lines(result.stderr)
    assert "tma-backup repository init" in line, line
    assert "Traceback" not in result.output
    if kind == "local path":
        assert not target.exists() and list((tmp_path / "offsite").iterdir()) == []
    else:
        assert repository.bucket not in {bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]}
    dump, _ = assert_counts_and_checksum(pg, backup_dir, tma_db)
    assert leftovers(backup_dir) == []
    verified = run_cli(["verify", str(dump)], env, tmp_path)
    assert verified.returncode == 0, verified.output


def test_repository_init_creates_it_once_and_a_second_init_changes_nothing(pg, s3, restic_bin, cache, tmp_path):
    repository = s3_repository(s3, cache)
    env = base_env(pg, tmp_path / "backups", **repository.settings)
    created = run_cli(["repository", "init"], env, tmp_path)
    assert snapshots(restic_bin, repository) == []  # a repository, readable with the password
    client = s3.client()

    def objects() -> dict[str, str]:
        listing = client.list_objects_v2(Bucket=repository.bucket)
        return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}

    before = objects()
    assert "sets/config" in before
    again = run_cli(["repository", "init"], env, tmp_path)
    assert again.returncode == 1, again.output
    [line] = error_lines(again.stderr)
    assert "already exists" in line and "nothing was changed" in line
    assert "Traceback" not in again.output
    assert objects() == before
    assert snapshots(restic_bin, repository) == []
    secrets_absent(created.output + again.output, REPOSITORY_PASSWORD, s3.secret_key)
    # Last, so that the checks above run either way: the first init succeeded as far as the operator can tell.
    assert created.returncode == 0, created.output
    assert error_lines(created.stderr) == []
    assert "Repository :" in created.stderr


def test_a_backup_sends_one_set_that_restic_alone_can_read(pg, env, repo, restic_bin, backup_dir, tma_db, tmp_path):
    result, dump = backup_in_process(env, tmp_path)
    meta = catalogue.inspect_backup(dump, tma_db, timestamp_of(dump, tma_db)).meta
    assert meta is not None
    [snapshot] = snapshots(restic_bin, repo)
    assert "tma-backup" in snapshot["tags"]
    assert tag_value(snapshot, "db:") == tma_db
    assert tag_value(snapshot, "at:") == meta.timestamp == timestamp_of(dump, tma_db)
    assert tag_value(snapshot, "run:") == meta.extra["run_id"]
    added = tag_value(snapshot, "added:")
    assert added is not None and int(added) > 0
    assert tag_value(snapshot, "size:") == str(dump.stat().st_size)
    with pg.connect() as connection:  # the set names the server it came from
        server = f"pg-{connection.execute('SELECT system_identifier FROM pg_control_system()').fetchone()[0]}"
    assert meta.extra["server_id"] == server
    assert set(snapshot["tags"]) == {"tma-backup", f"db:{tma_db}", f"server:{server}", f"at:{meta.timestamp}",
                                     f"run:{meta.extra['run_id']}", f"added:{added}", "part:database",
                                     f"size:{dump.stat().st_size}"}
    assert_set_holds(restic_bin, repo, snapshot, dump)
    assert sha256(dumped(restic_bin, repo, snapshot["id"], dump.name)) == meta.sha256
    [offsite_line] = [line for line in result.stderr.splitlines() if "Off site   :" in line]
    assert f"set {snapshot['short_id']} " in offsite_line, offsite_line

    listing = run_cli(["repository", "list", "--json"], env, tmp_path)
    assert listing.returncode == 0, listing.output
    [described] = [json.loads(line) for line in listing.stdout.splitlines()]
    assert described["id"] == snapshot["short_id"] == snapshot["id"][:8]
    assert described["database"] == tma_db and described["timestamp"] == meta.timestamp
    assert described["bytes_added"] == int(added) > 0
    secrets_absent(result.output + listing.output, REPOSITORY_PASSWORD, env["BACKUP_REPOSITORY_SECRET_ACCESS_KEY"])


def data_blobs(restic_bin: str, repository: Repository) -> dict[str, dict[str, Any]]:
    """Every data blob in the repository's index; restic records `uncompressed_length` for compressed ones."""
    blobs = {}
    for index in restic(restic_bin, repository, "list", "index").stdout.split():
        for pack in json.loads(restic(restic_bin, repository, "cat", "index", index).stdout)["packs"]:
            blobs.update({blob["id"]: blob for blob in pack["blobs"] if blob["type"] == "data"})
    return blobs


@pytest.mark.parametrize("meta_value, compressed", [
    ("6", True), ("gzip:9", True), ("lz4", True), ("zstd:3", True), ("zstd-stream:1", True),
    ("0", False), ("none", False), ("", False), ("unheard-of", False)])
def test_a_meta_tells_whether_its_dump_is_compressed(meta_value: str, compressed: bool) -> None:
    assert is_compressed(meta_value) is compressed


def test_restic_compresses_a_dump_only_when_it_is_not_compressed_already(
        env, repo, restic_bin, backup_dir, tma_db, tmp_path):
    backup_in_process(env, tmp_path)  # BACKUP_COMPRESSION's default: pg_dump's -Z6
    first = data_blobs(restic_bin, repo)
    assert first and not [blob for blob in first.values() if "uncompressed_length" in blob], first
    plain = run_cli(["backup"], {**env, "BACKUP_COMPRESSION": "0"}, tmp_path)
    assert plain.returncode == 0, plain.output
    added = {id_: blob for id_, blob in data_blobs(restic_bin, repo).items() if id_ not in first}
    assert added and all(blob["uncompressed_length"] > blob["length"] for blob in added.values()), added


# ---------------------------------------------------------------------------------------------------
# 4: through real workers


def test_the_chain_through_a_worker_sends_between_meta_and_prune(start_worker, repo, restic_bin, tma_db, tmp_path):
    backups = tmp_path / "worker-backups"
    worker = start_worker(backups, "host-chain", **repo.settings)
    app = client_app(worker.env["CELERY_BROKER_URL"])
    run = app.send_task("tma_backup.backup", kwargs={"database": tma_db}).get(timeout=60)
    assert run["step_names"] == ["dump", "verify", "checksum", "meta", "offsite", "prune"]
    summary = AsyncResult(run["steps"][-1], app=app).get(timeout=180)
    offsite = summary["offsite"]
    assert {"set", "bytes_added", "seconds", "confirm_seconds"} <= set(offsite)
    assert offsite["bytes_added"] > 0 and 0 < offsite["confirm_seconds"] < offsite["seconds"]
    assert offsite["sent"][0]["confirm_seconds"] == offsite["confirm_seconds"], "one set sent: its read-back is the link's"
    [snapshot] = snapshots(restic_bin, repo)
    assert offsite["set"] == snapshot["short_id"]
    assert [item["set"] for item in offsite["sent"]] == [snapshot["short_id"]]
    dump, meta = only_backup(backups, tma_db)
    assert tag_value(snapshot, "at:") == meta.timestamp
    assert_set_holds(restic_bin, repo, snapshot, dump)
    log = worker.log()
    succeeded = [log.index(f"Task tma_backup.{name}[{step}] succeeded")
                 for name, step in zip(run["step_names"], run["steps"], strict=True)]
    assert succeeded == sorted(succeeded), "the links ran in chain order: meta, then offsite, then prune"


# ---------------------------------------------------------------------------------------------------
# 5: a failed offsite link heals at the next run


def test_a_run_that_could_not_send_is_sent_by_the_next_one(env, repo, restic_bin, backup_dir, tma_db, tmp_path):
    failed = run_cli(["backup"], {**env, "BACKUP_REPOSITORY_PASSWORD": WRONG_PASSWORD}, tmp_path)
    assert failed.returncode == 1, failed.output
    lines = error_lines(failed.stderr)
    assert len(lines) == 1, failed.output
    assert "refused the password" in lines[0]
    secrets_absent(failed.output, WRONG_PASSWORD, REPOSITORY_PASSWORD)
    assert snapshots(restic_bin, repo) == []
    first, first_meta = only_backup(backup_dir, tma_db)
    # The failed run was yesterday's (a set per day is what REPOSITORY_KEEP_DAILY keeps): move it there.
    yesterday = craft(first, tma_db, backup_dir, moment(days_ago=1))
    first.unlink()
    catalogue.meta_path(first).unlink()

    healed = run_cli(["backup"], env, tmp_path)
    assert healed.returncode == 0, healed.output
    local = backups_in(backup_dir, tma_db)
    assert local[0] == yesterday and len(local) == 2
    sets = our_sets(restic_bin, repo, tma_db)
    assert [tag_value(found, "at:") for found in sets] == [timestamp_of(path, tma_db) for path in local], healed.output
    for found, dump in zip(sets, local, strict=True):
        assert_set_holds(restic_bin, repo, found, dump)
        assert int(tag_value(found, "added:") or 0) >= 0
    assert tag_value(sets[0], "run:") == first_meta.extra["run_id"], "a set is tagged with its backup's own run"
    assert tag_value(sets[1], "run:") != first_meta.extra["run_id"]
    assert f"also sent the backup of {timestamp_of(yesterday, tma_db)} (set {sets[0]['short_id']})" in healed.stderr


def test_catching_up_does_not_depend_on_the_listing_finishing_before_this_runs_upload(
        pg, env, repo, restic_bin, tma_db, tmp_path, monkeypatch):
    """The offsite link lists the repository before any upload starts, so the listing can never already
    show this run's set (when it did, beside the upload, the backups that earlier runs could not send
    were skipped): they are sent all the same, oldest first."""
    local_dir = tmp_path / "local"
    made = run_cli(["backup"], base_env(pg, local_dir, DB_NAME=tma_db), tmp_path)  # local only
    assert made.returncode == 0, made.output
    current, _ = only_backup(local_dir, tma_db)
    unsent = craft(current, tma_db, local_dir, moment(days_ago=1))  # yesterday's run could not send
    real_listing = offsite_module.list_sets
    uploads_during_listing: list[tuple[str, ...]] = []

    def watched_listing(restic_runner: Restic, database: str) -> Any:
        time.sleep(1)  # a slow listing: an upload started beside it would show now
        uploads_during_listing.extend(argv for argv in restic_children() if "backup" in argv)
        return real_listing(restic_runner, database)

    monkeypatch.setattr(offsite_module, "list_sets", watched_listing)
    settings = settings_for({**env, "BACKUP_DIR": str(local_dir)})
    result = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", made_on(current), str(current))
    assert uploads_during_listing == [], "no upload runs beside the listing"
    sent = [item["timestamp"] for item in result["sent"]]
    assert sent == [timestamp_of(unsent, tma_db), timestamp_of(current, tma_db)], \
        "the backup an earlier run could not send is sent too, oldest first"
    assert result["set"] == result["sent"][-1]["set"], "the run's own set is its own backup's"
    assert sorted(tag_value(found, "at:") for found in our_sets(restic_bin, repo, tma_db)) == sorted(sent)


def test_the_prune_link_hands_its_listing_to_the_next_runs_offsite_link_once(
        env, repo, restic_bin, backup_dir, tma_db, tmp_path, monkeypatch):
    """The prune link's listing (after retention) is left in BACKUP_DIR for the next run's offsite link,
    which then sends its own backup without listing the repository again. It is taken once: a retried
    link, a note that leaves an older backup to send, or one of another repository lists the repository."""
    first_run = run_cli(["backup"], env, tmp_path)
    assert first_run.returncode == 0, first_run.output
    first, _ = only_backup(backup_dir, tma_db)
    [note] = backup_dir.glob(".offsite-listing-*.json")
    assert note.stat().st_mode & 0o777 == 0o600
    assert json.loads(note.read_text())["timestamps"] == [timestamp_of(first, tma_db)]
    settings = settings_for(env)
    real_listing = offsite_module.list_sets
    listings: list[str] = []

    def counted_listing(restic_runner: Restic, database: str) -> Any:
        listings.append(database)
        return real_listing(restic_runner, database)

    monkeypatch.setattr(offsite_module, "list_sets", counted_listing)
    second = craft(first, tma_db, backup_dir, moment(hours=-1))
    server = made_on(first)
    handed = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", server, str(second))
    assert (handed["listing"], listings) == ("handed over", [])
    assert [item["timestamp"] for item in handed["sent"]] == [timestamp_of(second, tma_db)]
    assert list(backup_dir.glob(".offsite-listing-*")) == [], "taken: it is used once"

    retried = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", server, str(second))
    assert (retried["listing"], listings, retried["sent"]) == ("repository", [tma_db], []), "no set twice"

    # A note that leaves an older backup to send (it says the repository is empty) is not trusted.
    handover.hand_over(settings, tma_db, server, set())
    third = craft(first, tma_db, backup_dir, moment(hours=-2))
    listed = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", server, str(third))
    assert (listed["listing"], len(listings)) == ("repository", 2)
    assert [item["timestamp"] for item in listed["sent"]] == [timestamp_of(third, tma_db)]
    # Nor is a note of another repository.
    handover.hand_over(settings_for({**env, "BACKUP_REPOSITORY": str(tmp_path / "elsewhere")}), tma_db, server,
                       {timestamp_of(third, tma_db)})
    fourth = craft(first, tma_db, backup_dir, moment(hours=-3))
    other = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", server, str(fourth))
    assert (other["listing"], len(listings)) == ("repository", 3)
    assert sorted(tag_value(found, "at:") for found in our_sets(restic_bin, repo, tma_db)) == [
        timestamp_of(path, tma_db) for path in (first, second, third, fourth)]


def restic_children() -> list[tuple[str, ...]]:
    """The argv of every restic process this (the test's) process has started and that is running."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and argv and argv[0].endswith(b"restic"):
            found.append(tuple(arg.decode(errors="replace") for arg in argv if arg))
    return found


def test_the_offsite_link_never_runs_two_locking_restic_processes_at_once(
        pg, env, repo, restic_bin, tma_db, tmp_path):
    """restic 0.14 retries loading a lock file that another restic process removed between listing and
    loading it, for about a minute ("Load(<lock/…>) returned error, retrying after …: The specified key
    does not exist"): long enough for REPOSITORY_STALL_TIMEOUT to kill a healthy backup, and a minute
    lost otherwise. So beside one restic command that takes restic's lock, any other one on the same
    repository must be lock-free (`--no-lock`); our own repository lock already keeps writers apart."""
    local_dir = tmp_path / "local"
    made = run_cli(["backup"], base_env(pg, local_dir, DB_NAME=tma_db), tmp_path)  # local only
    assert made.returncode == 0, made.output
    current, _ = only_backup(local_dir, tma_db)
    samples: list[list[tuple[str, ...]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            running = restic_children()
            if running:
                samples.append(running)
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        settings = settings_for({**env, "BACKUP_DIR": str(local_dir)})
        result = offsite_module.offsite(settings, tma_db, f"test-{uuid.uuid4()}", made_on(current), str(current))
    finally:
        stop.set()
        sampler.join()
    assert result["set"] and any(any(" backup " in " ".join(argv) + " " for argv in found) for found in samples)
    overlapping = [found for found in samples if len([argv for argv in found if "--no-lock" not in argv]) > 1]
    assert overlapping == [], f"two restic processes held restic's lock at once: {overlapping[0]}"


# ---------------------------------------------------------------------------------------------------
# 6: calendar retention, and nothing but our sets of this database


def test_calendar_retention_keeps_the_newest_set_of_each_kept_day_and_nothing_else_is_touched(
        pg, repo, restic_bin, tma_db, tmp_path):
    source_dir = tmp_path / "source"
    made = run_cli(["backup"], base_env(pg, source_dir, DB_NAME=tma_db), tmp_path)  # local only
    assert made.returncode == 0, made.output
    source, _ = only_backup(source_dir, tma_db)
    env = base_env(pg, tmp_path / "crafted", DB_NAME=tma_db, REPOSITORY_KEEP_DAILY="2", REPOSITORY_KEEP_WEEKLY="0",
                   REPOSITORY_KEEP_MONTHLY="0", REPOSITORY_KEEP_YEARLY="0", REPOSITORY_KEEP_WITHIN="",
                   REPOSITORY_KEEP_WITHIN_HOURLY="", **repo.settings)  # the count rules alone
    stamps = ["20260105T080000Z", "20260106T080000Z", "20260107T080000Z", "20260107T200000Z",
              "20260108T080000Z", "20260108T200000Z"]
    for stamp in stamps:
        send_crafted(env, craft(source, tma_db, tmp_path / "crafted", stamp), tma_db)

    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    (foreign_dir / "notes.txt").write_text("an operator's own snapshot\n")
    for tags in ("", f"db:{tma_db},at:20260101T000000Z", f"tma-backup,db:{tma_db}_other,at:20260102T000000Z",
                 f"tma-backup,db:{tma_db}_other,at:20260102T010000Z"):
        restic(restic_bin, repo, "backup", "--time", "2026-01-02 00:00:00", *(["--tag", tags] if tags else []),
               str(foreign_dir))
    before = {snapshot["id"]: snapshot for snapshot in snapshots(restic_bin, repo)}
    ours = {snapshot["id"] for snapshot in our_sets(restic_bin, repo, tma_db)}
    foreign = set(before) - ours
    assert len(ours) == 6 and len(foreign) == 4

    settings = settings_for(env)
    forgotten = forget(Restic(settings), settings, tma_db, made_on(source)).forgotten
    after = {snapshot["id"]: snapshot for snapshot in snapshots(restic_bin, repo)}
    kept = [tag_value(snapshot, "at:") for snapshot in our_sets(restic_bin, repo, tma_db)]
    assert kept == ["20260107T200000Z", "20260108T200000Z"], "the newest set of each of the 2 newest days"
    assert foreign <= set(after), "snapshots this tool did not make for this database are untouched"
    assert {key: after[key] for key in foreign} == {key: before[key] for key in foreign}
    assert sorted(forgotten) == sorted(key[:8] for key in ours - set(after))
    assert len(forgotten) == 4
    # Again: nothing more to forget, and the newest set stays.
    assert forget(Restic(settings), settings, tma_db, made_on(source)).forgotten == []
    assert [tag_value(snapshot, "at:") for snapshot in our_sets(restic_bin, repo, tma_db)][-1] == stamps[-1]
    check = restic(restic_bin, repo, "check")
    assert check.returncode == 0


# ---------------------------------------------------------------------------------------------------
# 7-8: a fresh machine restores and drills from the repository


def test_a_fresh_machine_restores_the_latest_set_through_a_worker_and_in_process(
        pg, admin, env, repo, start_worker, tma_db, tmp_path):
    _, dump = backup_in_process(env, tmp_path)
    at_backup = digests(pg, tma_db)
    expected_sha = sha256_file(dump)
    try:
        change_live(pg, tma_db)
        assert digests(pg, tma_db) != at_backup
        fresh = tmp_path / "fresh-machine" / "backups"
        fresh.mkdir(parents=True, mode=0o700)
        worker = start_worker(fresh, "host-fresh", **repo.settings)
        broker_env = {**worker.env, "DB_NAME": tma_db}
        restored = run_cli(["restore", "--from-repository", "latest", "--database", tma_db, "--confirm", tma_db],
                           broker_env, tmp_path)
        assert restored.returncode == 0, restored.output
        assert digests(pg, tma_db) == at_backup
        fetched, meta = only_backup(fresh, tma_db)
        assert fetched.name == dump.name
        assert sha256_file(fetched) == meta.sha256 == expected_sha
        assert catalogue.meta_path(fetched).read_bytes() == catalogue.meta_path(dump).read_bytes()
        assert leftovers(fresh) == []
        drop_kept_copies(admin)

        change_live(pg, tma_db)
        other = tmp_path / "another-machine" / "backups"
        other.mkdir(parents=True, mode=0o700)
        in_process = {**env, "BACKUP_DIR": str(other)}
        restored = run_cli(["restore", "--from-repository", "latest", "--database", tma_db, "--confirm", tma_db],
                           in_process, tmp_path)
        assert restored.returncode == 0, restored.output
        assert digests(pg, tma_db) == at_backup
        fetched, meta = only_backup(other, tma_db)
        assert sha256_file(fetched) == meta.sha256 == expected_sha
        assert leftovers(other) == []
    finally:
        drop_kept_copies(admin)


@pytest.mark.parametrize("tagged", [True, False], ids=["size tag", "set without a size tag"])
def test_a_fetch_without_room_is_refused_before_anything_is_written(
        tagged, pg, env, repo, restic_bin, tma_db, tmp_path):
    """The fetch checks BACKUP_DIR's free space against the backup's size before it downloads: the size
    comes from the set's `size:` tag or, for a set written before that tag, from `restic ls`."""
    _, dump = backup_in_process(env, tmp_path)
    [snapshot] = snapshots(restic_bin, repo)
    size = dump.stat().st_size
    if not tagged:
        restic(restic_bin, repo, "tag", "--remove", f"size:{size}", snapshot["id"])
        [snapshot] = snapshots(restic_bin, repo)
        assert tag_value(snapshot, "size:") is None
    before = digests(pg, tma_db)
    with tmpfs(tmp_path / "small", "16m") as small:  # less than the fetch's 64 MiB margin
        result = run_cli(["restore", "--from-repository", "latest", "--database", tma_db, "--confirm", tma_db],
                         {**env, "BACKUP_DIR": str(small)}, tmp_path)
        assert result.returncode == 1, result.output
        [line] = error_lines(result.stderr)
        assert "not enough free space" in line and f"it needs {human_size(size)}B" in line, line
        assert "nothing was written" in line and "Traceback" not in result.output
        assert list(small.iterdir()) == []
    assert digests(pg, tma_db) == before


def test_a_drill_from_the_repository_proves_the_set_and_a_corrupt_set_fails_it(
        env, repo, restic_bin, backup_dir, tma_db, tmp_path):
    _, dump = backup_in_process(env, tmp_path)
    empty = tmp_path / "drill-machine"
    empty.mkdir(mode=0o700)
    drill_env = {**env, "BACKUP_DIR": str(empty)}
    drilled = run_cli(["drill", "--from-repository", "latest"], drill_env, tmp_path)
    assert drilled.returncode == 0, drilled.output
    [good] = our_sets(restic_bin, repo, tma_db)
    assert f"Off site   : set {good['short_id']} fetched and checked" in drilled.stderr
    assert sorted(path.name for path in empty.iterdir()) == [f".{tma_db}.last-drill.json"]
    record = json.loads((empty / f".{tma_db}.last-drill.json").read_text())
    assert record["result"] == "pass"

    # A set whose dump is not what its .meta records (sent as it is: restic stores what it is given).
    tampered = craft(dump, tma_db, tmp_path / "tampered", moment(hours=1), tamper=True)
    sent = send_crafted(env, tampered, tma_db)
    before = {path.name: sha256_file(path) for path in backup_dir.iterdir() if path.is_file()}
    failed = run_cli(["drill", "--from-repository", sent.id[:8]], env, tmp_path)
    assert failed.returncode == 1, failed.output
    [line] = error_lines(failed.stderr)
    assert "SHA-256" in line and sent.id[:8] in line and tampered.name in line, line
    assert "Traceback" not in failed.output
    after = {path.name: sha256_file(path) for path in backup_dir.iterdir() if path.is_file()}
    record_name = f".{tma_db}.last-drill.json"
    assert {name: value for name, value in after.items() if name != record_name} == \
        {name: value for name, value in before.items() if name != record_name}
    assert not (backup_dir / tampered.name).exists() and leftovers(backup_dir) == []
    assert json.loads((backup_dir / record_name).read_text())["result"] == "fail"

    status = run_cli(["status"], env, tmp_path)
    [drill_line] = [line for line in status.stderr.splitlines() if "Last drill" in line]
    assert "FAILED" in drill_line and "SHA-256" in drill_line, status.output


# ---------------------------------------------------------------------------------------------------
# 9: status


def test_status_reports_the_newest_set_and_fails_when_the_repository_cannot_be_read_or_is_stale(
        pg, s3, env, repo, restic_bin, cache, backup_dir, tma_db, tmp_path):
    _, dump = backup_in_process(env, tmp_path)
    [found] = our_sets(restic_bin, repo, tma_db)
    status = run_cli(["status"], env, tmp_path)
    assert status.returncode == 0, status.output
    assert f"Off site   : set {found['short_id']} of {timestamp_of(dump, tma_db)}" in status.stderr
    assert error_lines(status.stderr) == []

    wrong = run_cli(["status"], {**env, "BACKUP_REPOSITORY_PASSWORD": WRONG_PASSWORD}, tmp_path)
    assert wrong.returncode == 1, wrong.output
    [line] = error_lines(wrong.stderr)
    assert "cannot be read" in line and "refused the password" in line
    secrets_absent(wrong.output, WRONG_PASSWORD, REPOSITORY_PASSWORD)

    s3.stop()
    try:
        down = run_cli(["status"], env, tmp_path, timeout=120)
    finally:
        s3.start()
    assert down.returncode == 1, down.output
    [line] = error_lines(down.stderr)
    assert "cannot reach the repository" in line, line

    stale = restic_init(restic_bin, s3_repository(s3, cache))
    stale_env = {**env, **stale.settings, "BACKUP_MAX_AGE_HOURS": "24"}
    old = craft(dump, tma_db, tmp_path / "old", moment(days_ago=3))
    send_crafted(stale_env, old, tma_db)
    result = run_cli(["status"], stale_env, tmp_path)
    assert result.returncode == 1, result.output
    [line] = error_lines(result.stderr)
    assert "newest set" in line and "over the limit" in line, line
    assert f"of {timestamp_of(old, tma_db)}, 72." in result.stderr
    assert "Age        : 0.0 h" in result.stderr, "the local backup itself is current"


# ---------------------------------------------------------------------------------------------------
# 10: secrets


def test_repository_secrets_stay_out_of_argv_logs_outputs_results_and_metas(
        start_worker, repo, redis_server, pg, admin, tma_db, tmp_path):
    backups = tmp_path / "worker-backups"
    worker = start_worker(backups, "host-secrets", **repo.settings)
    broker_env = {**worker.env, "DB_NAME": tma_db}
    secrets = (REPOSITORY_PASSWORD, repo.settings["BACKUP_REPOSITORY_SECRET_ACCESS_KEY"],
               repo.settings["BACKUP_REPOSITORY_ACCESS_KEY_ID"], TEST_PASSWORD)
    try:
        with PsSampler() as sampler:
            backed_up = run_cli(["backup"], broker_env, tmp_path)
            assert backed_up.returncode == 0, backed_up.output
            restored = run_cli(["restore", "--from-repository", "latest", "--confirm", tma_db], broker_env, tmp_path)
            assert restored.returncode == 0, restored.output
        assert any("restic" in line and " backup " in f"{line} " for line in sampler.lines), \
            "the sampler must have seen restic running"
        assert any("restic" in line and " restore " in line for line in sampler.lines), \
            "the sampler must have seen restic fetching the set"
        assert [line for line in sampler.lines if any(secret in line for secret in secrets)] == []
        secrets_absent(backed_up.output + restored.output, *secrets)
        secrets_absent(worker.log(), *secrets)
        stored = redis_values(redis.Redis.from_url(worker.env["CELERY_BROKER_URL"]))
        assert b"celery-task-meta-" in stored and b"offsite" in stored
        secrets_absent(stored, *secrets)
        for meta in backups.glob("*.meta"):
            secrets_absent(meta.read_text(), *secrets)
        assert list(backups.glob("*.meta"))
    finally:
        drop_kept_copies(admin)


# ---------------------------------------------------------------------------------------------------
# 11-12: bad settings, wrong credentials


KEY_ID, SECRET = "AKIA-Distinct-Key-9d2e", "Secret-Distinct-4f7a0b"  # never checked: the settings are refused first
S3_ADDRESS = "s3:http://127.0.0.1:9/bucket"
WITH_PASSWORD = {"BACKUP_REPOSITORY_PASSWORD": REPOSITORY_PASSWORD}
BAD_SETTINGS = {
    "no password": ({"BACKUP_REPOSITORY": "/srv/restic"}, "BACKUP_REPOSITORY needs its password"),
    "password and file": ({"BACKUP_REPOSITORY": "/srv/restic", **WITH_PASSWORD,
                           "BACKUP_REPOSITORY_PASSWORD_FILE": "{password_file}"}, "not both"),
    "missing password file": ({"BACKUP_REPOSITORY": "/srv/restic", "BACKUP_REPOSITORY_PASSWORD_FILE": "{missing}"},
                              "BACKUP_REPOSITORY_PASSWORD_FILE"),
    "s3 without a bucket": ({"BACKUP_REPOSITORY": "s3:http://127.0.0.1:9/", **WITH_PASSWORD,
                             "BACKUP_REPOSITORY_ACCESS_KEY_ID": KEY_ID, "BACKUP_REPOSITORY_SECRET_ACCESS_KEY": SECRET},
                            "must name a bucket"),
    "s3 without keys": ({"BACKUP_REPOSITORY": S3_ADDRESS, **WITH_PASSWORD}, "BACKUP_REPOSITORY_ACCESS_KEY_ID"),
    "only the key id": ({"BACKUP_REPOSITORY": S3_ADDRESS, **WITH_PASSWORD, "BACKUP_REPOSITORY_ACCESS_KEY_ID": KEY_ID},
                        "go together"),
    "only the secret": ({"BACKUP_REPOSITORY": S3_ADDRESS, **WITH_PASSWORD,
                         "BACKUP_REPOSITORY_SECRET_ACCESS_KEY": SECRET}, "go together"),
    "every keep zero": ({"BACKUP_REPOSITORY": "/srv/restic", **WITH_PASSWORD, "REPOSITORY_KEEP_DAILY": "0",
                         "REPOSITORY_KEEP_WEEKLY": "0", "REPOSITORY_KEEP_MONTHLY": "0", "REPOSITORY_KEEP_YEARLY": "0",
                         "REPOSITORY_KEEP_WITHIN": "", "REPOSITORY_KEEP_WITHIN_HOURLY": ""}, "REPOSITORY_KEEP_"),
    "a keep-within that is no duration": ({"BACKUP_REPOSITORY": "/srv/restic", **WITH_PASSWORD,
                                           "REPOSITORY_KEEP_WITHIN": "3 days"}, "REPOSITORY_KEEP_WITHIN"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_repository_settings_are_one_line_and_exit_2(case, pg, backup_dir, tmp_path):
    given, expected = BAD_SETTINGS[case]
    password_file = tmp_path / "repository-password"
    password_file.write_text(REPOSITORY_PASSWORD + "\n")
    paths = {"password_file": str(password_file), "missing": str(tmp_path / "no-such-password-file")}
    settings = {key: value.format(**paths) for key, value in given.items()}
    env = base_env(pg, backup_dir, DB_NAME="tma_never_dumped", **settings)
    for command in (["backup"],):
        result = run_cli(command, env, tmp_path)
        assert result.returncode == 2, (command, result.output)
        [line] = error_lines(result.stderr)
        assert expected in line, (command, line)
        assert "Traceback" not in result.output
        secrets_absent(result.output, REPOSITORY_PASSWORD, SECRET, KEY_ID)
    assert list(backup_dir.iterdir()) == []


@pytest.mark.parametrize("wrong", ["BACKUP_REPOSITORY_SECRET_ACCESS_KEY", "BACKUP_REPOSITORY_ACCESS_KEY_ID"])
def test_wrong_s3_credentials_fail_the_run_with_one_line_and_the_backup_stays_complete(
        wrong, pg, env, repo, restic_bin, backup_dir, tma_db, tmp_path):
    bad_value = f"Wrong-{wrong[-6:]}-Distinct-{uuid.uuid4().hex[:8]}"
    result = run_cli(["backup"], {**env, wrong: bad_value}, tmp_path)
    assert result.returncode == 1, result.output
    [line] = error_lines(result.stderr)
    assert "refused the credentials" in line, line
    assert "Traceback" not in result.output
    secrets_absent(result.output, bad_value, REPOSITORY_PASSWORD, repo.settings["BACKUP_REPOSITORY_SECRET_ACCESS_KEY"])
    assert_counts_and_checksum(pg, backup_dir, tma_db)
    assert leftovers(backup_dir) == []
    assert snapshots(restic_bin, repo) == []
