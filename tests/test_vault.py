"""The vault (issue 22): a second repository on another machine that pulls the primary's sets and that
nothing on the TMA Cloud host can erase.

Two hosts on one machine, each with its own environment, broker (a private Redis), Celery worker and
folders: the TMA side backs up a TMA-Cloud-shaped database and its uploads into the primary bucket; the
vault side pulls them into a bucket of its own. One SeaweedFS serves both buckets with three
identities (`tests/s3_identities.py`): the TMA host's (read, list, write on the primary), the vault's
(read and list on the primary, nothing more; read, list, write on its own bucket) and the admin, who made
the buckets. Notifications go to a local receiver (`tests/test_notify.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests import services, tma_cloud
from tests.conftest import _unavailable, base_env, run_cli
from tests.helpers import error_lines, wait_for
from tests.s3_identities import Identity, IdentityServer, start_with_identities
from tests.test_notify import Receiver, receiver  # noqa: F401  (the fixture)
from tests.test_repository import REPOSITORY_PASSWORD, Repository, _restic_env, restic, snapshots, tag_value
from tests.test_restore import digests
from tests.test_uploads import make_site
from tests.test_workers import client_app
from worker.celery_app import host_queue

pytestmark = pytest.mark.slow

VAULT_PASSWORD = "Vault-Pw-For-Tests-51e0c2b9"
PRIMARY, VAULT = "primary", "vault"
TMA_IDENTITY = Identity("tma-host", (f"Read:{PRIMARY}", f"List:{PRIMARY}", f"Write:{PRIMARY}", f"Tagging:{PRIMARY}"))
VAULT_IDENTITY = Identity("vault-host", (f"Read:{PRIMARY}", f"List:{PRIMARY}",
                                         f"Read:{VAULT}", f"List:{VAULT}", f"Write:{VAULT}", f"Tagging:{VAULT}"))


@pytest.fixture(scope="module")
def buckets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityServer]:
    try:
        server = start_with_identities(tmp_path_factory.mktemp("s3-identities"), [TMA_IDENTITY, VAULT_IDENTITY],
                                       [PRIMARY, VAULT])
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    yield server
    server.stop()


@dataclass
class Host:
    """One machine's tma-backup: its environment, broker and worker."""

    name: str
    env: dict[str, str]
    folder: Path
    broker: services.RedisServer
    worker: services.WorkerProcess | None = None

    def start(self) -> Host:
        worker_env = {**self.env, "CELERY_BROKER_URL": self.broker.url, "WORKER_HOST": self.name,
                      "TEST_CWD": str(self.folder)}
        self.worker = services.WorkerProcess(f"{self.name}@{self.name}", worker_env,
                                             self.folder / f"worker-{self.name}.log").start()
        return self

    @property
    def worker_env(self) -> dict[str, str]:
        assert self.worker is not None
        return self.worker.env

    def cli(self, *args: str, through_worker: bool = True, timeout: float = 300) -> Any:
        return run_cli(list(args), self.worker_env if through_worker else self.env, self.folder, timeout=timeout)

    def task(self, name: str, timeout: float = 300, **kwargs: Any) -> Any:
        app = client_app(self.broker.url)
        return app.send_task(name, kwargs=kwargs, queue=host_queue(self.name)).get(timeout=timeout,
                                                                                   propagate=False)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.broker.stop()


def prefixed(repository: str, password: str, identity: Identity, prefix: str) -> dict[str, str]:
    return {prefix: repository, f"{prefix}_PASSWORD": password, **identity.settings(prefix)}


def vault_env(folder: Path, buckets: IdentityServer, receiver: Receiver | None = None, **extra: str) -> dict[str, str]:
    """A vault host's environment: nothing of the database's; the primary read with the vault's key."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DB_", "BACKUP_", "CELERY_", "RESTORE_", "PG", "WORKER_", "VAULT_", "NOTIFY",
                                  "HEALTHCHECK", "UPLOAD", "TMA_", "AWS_"))}
    env.update({"PYTHONPATH": str(services.REPO), "BACKUP_DIR": str(folder / "vault-state"),
                **prefixed(buckets.url(PRIMARY), REPOSITORY_PASSWORD, VAULT_IDENTITY, "BACKUP_REPOSITORY"),
                **prefixed(buckets.url(VAULT), VAULT_PASSWORD, VAULT_IDENTITY, "VAULT_REPOSITORY"),
                "REPOSITORY_STALL_TIMEOUT": "20", **extra})
    if receiver is not None:
        env.update(NOTIFY_URLS=receiver.notify_url(), HEALTHCHECK_URL=receiver.healthcheck_url())
    return env


def hostile_messages(database: str) -> list[tuple[str, dict[str, Any]]]:
    """Every registered task name, each with hostile values for every argument it takes."""
    import inspect

    from tests.test_task_registry import EXPECTED_TASKS
    from worker.celery_app import app

    app.loader.import_default_modules()
    run = {"run_id": "forged", "database": database, "backup": "/etc/passwd", "timestamp": "20260101T000000Z",
           "host": "tma-host", "started_at": 0, "warnings": []}
    values: dict[str, Any] = {"database": database, "scheduled": True, "reference": "latest", "token": "forged",
                              "confirm": database, "file": "/etc/passwd", "run": run, "server": "pg-1",
                              "checksum": False, "mode": "in-place", "uploads": "with", "token_hash": "0" * 64}
    messages = []
    for name in sorted(EXPECTED_TASKS):
        parameters = [parameter for parameter in inspect.signature(app.tasks[name].run).parameters
                      if parameter not in ("self", "request", "exc", "traceback")]
        messages.append((name, {parameter: values.get(parameter, "../../hostile") for parameter in parameters}))
    return messages


@pytest.fixture
def two_hosts(pg, tma_db, buckets, receiver, tmp_path) -> Iterator[tuple[Host, Host, Any]]:
    """The TMA host (a site with uploads, the primary in the shared server's `primary` bucket, under a
    folder of its own in it so each test starts empty) and the vault host, both running."""
    prefix = uuid.uuid4().hex[:8]
    primary = buckets.url(PRIMARY, prefix)
    restic_env = _restic_env(primary, REPOSITORY_PASSWORD, tmp_path / "cache-tma", TMA_IDENTITY.aws_env())
    subprocess.run(["restic", "init"], env=restic_env, check=True, capture_output=True)
    repository = Repository(primary, prefixed(primary, REPOSITORY_PASSWORD, TMA_IDENTITY, "BACKUP_REPOSITORY"),
                            restic_env, PRIMARY)
    tma_folder, vault_folder = tmp_path / "tma-host", tmp_path / "vault-host"
    tma_folder.mkdir()
    vault_folder.mkdir()
    site = make_site(pg, tma_db, tma_folder, repository)
    tma = Host("tma-host", site.env, tma_folder, services.start_redis()).start()
    vault = Host("vault-host", {**vault_env(vault_folder, buckets, receiver),
                                "BACKUP_REPOSITORY": primary, "VAULT_REPOSITORY": buckets.url(VAULT, prefix)},
                 vault_folder, services.start_redis()).start()
    try:
        yield tma, vault, site
    finally:
        tma.stop()
        vault.stop()


def vault_repository(vault: Host, cache: Path) -> Repository:
    address = vault.env["VAULT_REPOSITORY"]
    return Repository(address, {}, _restic_env(address, VAULT_PASSWORD, cache, VAULT_IDENTITY.aws_env()), VAULT)


def sets_by_key(restic_bin: str, repository: Repository) -> dict[tuple[str | None, str | None], dict[str, Any]]:
    return {(tag_value(item, "at:"), tag_value(item, "part:")): item for item in snapshots(restic_bin, repository)}


def watch_state(vault: Host) -> dict[str, Any]:
    return json.loads((Path(vault.env["BACKUP_DIR"]) / "vault-state.json").read_text())


def backup_through(tma: Host) -> None:
    result = tma.cli("backup")
    assert result.returncode == 0, result.output


# ---------------------------------------------------------------------------------------------------
# The attack


def test_an_intruder_holding_everything_on_the_tma_host_cannot_shrink_the_vault(
        pg, two_hosts, receiver, restic_bin, tmp_path):
    tma, vault, site = two_hosts
    assert vault.cli("vault", "init", through_worker=False).returncode == 0
    backup_through(tma)
    first = vault.task("tma_backup.vault_pull")
    assert isinstance(first, dict) and len(first["copied"]) == 1 and first["alarms"] == [], first
    tma_cloud.write_blob(site.folder / "late-upload.pdf", 700)
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute("INSERT INTO files (owner_id, path, mime, size) SELECT min(id), 'late-upload.pdf',"
                           " 'application/pdf', 700 FROM users")
    time.sleep(1.1)
    backup_through(tma)  # the primary's retention forgets the first set (same day): normal, no alarm
    second = vault.task("tma_backup.vault_pull")
    assert len(second["copied"]) == 1 and second["alarms"] == [] and second["problems"] == [], second
    good_rows, good_files = digests(pg, site.database), tma_cloud.folder_digests(site.folder)
    held = vault_repository(vault, tmp_path / "cache-vault")
    before = sets_by_key(restic_bin, held)
    assert len(before) == 4, sorted(before)  # two sets, each with its database and uploads parts

    # The intruder holds everything the TMA host holds.
    for path in Path(site.env["BACKUP_DIR"]).iterdir():
        path.unlink() if path.is_file() else shutil.rmtree(path)
    primary = Repository(site.repository.address, {}, site.repository.restic_env)
    ids = [item["id"] for item in snapshots(restic_bin, primary)]
    restic(restic_bin, primary, "forget", *ids)
    restic(restic_bin, primary, "prune")
    # The vault's next (hourly) pull sees the primary emptied: the sets retention keeps are gone.
    noticed = vault.task("tma_backup.vault_pull")
    assert isinstance(noticed, dict) and noticed["copied"] == [], noticed
    assert [alarm for alarm in noticed["alarms"] if "vanished" in alarm], noticed
    assert sets_by_key(restic_bin, held) == before
    app = client_app(tma.broker.url)
    sent = [app.send_task(name, kwargs=kwargs, queue=queue) for name, kwargs in hostile_messages(site.database)
            for queue in ("tma_backup", host_queue("tma-host"))]
    for result in sent:
        result.get(timeout=120, propagate=False)
    server = tag_value(next(iter(before.values())), "server:")
    now = datetime.now(timezone.utc)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "x.dump").write_bytes(b"not a backup")
    for day in range(1, 51):
        moment = now - timedelta(days=day, hours=3)
        stamp = moment.strftime("%Y%m%dT%H%M%SZ")
        args = ("backup", "--time", moment.strftime("%Y-%m-%d %H:%M:%S"), "--tag",
                f"tma-backup,db:{site.database},server:{server},at:{stamp},part:database", str(fake))
        # (the chain a hostile `tma_backup.backup` started may still hold the primary's lock for a moment)
        wait_for(lambda args=args: restic(restic_bin, primary, *args, check=False).returncode == 0, timeout=60, interval=1,
                 what="a back-dated set written into the primary")

    # The vault's next pull: it holds every set it had, copies none of the fakes, and says so.
    pulled = vault.task("tma_backup.vault_pull")
    assert isinstance(pulled, dict), pulled
    # Every fake still in the primary (the hostile backup's own retention may have forgotten a few) is named.
    fakes = {tag_value(item, "at:") for item in snapshots(restic_bin, primary) if str(fake) in item.get("paths", [])}
    assert len(fakes) >= 40, len(fakes)
    [alarm] = [alarm for alarm in watch_state(vault)["alarms"] if alarm["kind"] == "back-dated"]
    assert set(alarm["sets"]) == fakes and f"{len(fakes)} back-dated" in " ".join(pulled["alarms"]), alarm
    after = sets_by_key(restic_bin, held)
    assert {key: after[key]["tree"] for key in before} == {key: item["tree"] for key, item in before.items()}, \
        "the vault holds every set it had"
    assert not [key for key, item in after.items() if str(fake) in item.get("paths", [])], "no fake set was copied"
    # (a set the hostile `tma_backup.backup` message made is a real one, and may be copied)
    maintained = vault.task("tma_backup.vault_maintenance")
    assert isinstance(maintained, dict), maintained
    assert set(before) <= set(sets_by_key(restic_bin, held)), "the vault's upkeep forgot nothing of it"
    assert restic(restic_bin, held, "check").returncode == 0
    wait_for(lambda: any("ALARM" in (message.get("title") or "") for message in receiver.messages()),
             what="the vault's alarm message")
    assert ("fail" in [kind for kind, _ in receiver.pings()]), receiver.pings()
    status = vault.cli("status", "--json", through_worker=False)
    assert status.returncode == 1, status.output
    facts = json.loads(status.stdout)
    assert facts["ok"] is False and facts["vault"]["alarms"], facts
    assert "Traceback" not in status.output

    # Disaster recovery from the vault alone: a fresh folder, the vault's address and password.
    fresh = tmp_path / "fresh-machine"
    uploads = fresh / "uploads"
    uploads.mkdir(parents=True)
    env_file = fresh / "tma.env"
    env_file.write_text(f"STORAGE_DRIVER=local\nUPLOAD_DIR={uploads}\n")
    recovery = base_env(pg, fresh / "backups", DB_NAME=site.database, TMA_ENV_FILE=str(env_file),
                        BACKUP_REPOSITORY=vault.env["VAULT_REPOSITORY"], BACKUP_REPOSITORY_PASSWORD=VAULT_PASSWORD,
                        **VAULT_IDENTITY.settings())
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute("DELETE FROM audit_log")
    restored = run_cli(["restore", "--from-repository", "latest", "--with-uploads", "--confirm", site.database],
                       recovery, fresh)
    assert restored.returncode == 0, restored.output
    assert digests(pg, site.database) == good_rows
    assert tma_cloud.folder_digests(uploads) == good_files, "every upload, byte for byte"
    assert REPOSITORY_PASSWORD not in vault.worker.log() + tma.worker.log()  # type: ignore[union-attr]
    assert VAULT_PASSWORD not in vault.worker.log() + status.output + restored.output  # type: ignore[union-attr]


def test_the_vaults_key_can_read_the_primary_and_nothing_more(buckets, restic_bin, tmp_path):
    """The least rights a pull needs: read and list (no `locks/`): the vault's key cannot lock, forget or
    write anything in the primary; the TMA host's key cannot touch the vault's bucket."""
    prefix = uuid.uuid4().hex[:8]
    admin_primary = Repository(buckets.url(PRIMARY, prefix), {}, _restic_env(
        buckets.url(PRIMARY, prefix), REPOSITORY_PASSWORD, tmp_path / "c1", buckets.aws_env()), PRIMARY)
    restic(restic_bin, admin_primary, "init")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_bytes(os.urandom(5000))
    restic(restic_bin, admin_primary, "backup", str(tmp_path / "data"))
    as_vault = Repository(admin_primary.address, {}, _restic_env(
        admin_primary.address, REPOSITORY_PASSWORD, tmp_path / "c2", VAULT_IDENTITY.aws_env()), PRIMARY)
    assert restic(restic_bin, as_vault, "snapshots", "--no-lock").returncode == 0
    for argv in (("forget", "latest"), ("backup", str(tmp_path / "data"))):
        refused = restic(restic_bin, as_vault, *argv, check=False)
        assert refused.returncode != 0, f"the vault's key could {argv[0]} in the primary"
    assert len(snapshots(restic_bin, admin_primary)) == 1
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=buckets.endpoint, region_name="us-east-1",
                          aws_access_key_id=VAULT_IDENTITY.access_key, aws_secret_access_key=VAULT_IDENTITY.secret_key)
    objects = client.list_objects_v2(Bucket=PRIMARY, Prefix=f"{prefix}/snapshots/")["Contents"]
    for attempt in (lambda: client.delete_object(Bucket=PRIMARY, Key=objects[0]["Key"]),
                    lambda: client.put_object(Bucket=PRIMARY, Key=f"{prefix}/locks/x", Body=b"x")):
        with pytest.raises(ClientError, match="AccessDenied|Access Denied"):
            attempt()
    assert len(snapshots(restic_bin, admin_primary)) == 1
    as_tma = Repository(buckets.url(VAULT, prefix), {}, _restic_env(
        buckets.url(VAULT, prefix), VAULT_PASSWORD, tmp_path / "c3", TMA_IDENTITY.aws_env()), VAULT)
    refused = restic(restic_bin, as_tma, "init", check=False)
    assert refused.returncode != 0, "the TMA host's key wrote into the vault's bucket"


# ---------------------------------------------------------------------------------------------------
# Outages, a killed pull, normal retention


def test_outages_of_the_primary_and_a_killed_pull_heal_at_the_next_pull(
        pg, two_hosts, buckets, restic_bin, tmp_path):
    tma, vault, _ = two_hosts
    assert vault.cli("vault", "init", through_worker=False).returncode == 0
    backup_through(tma)
    buckets.stop()
    try:
        failed = vault.cli("vault", "pull", through_worker=False, timeout=120)
        assert failed.returncode == 1, failed.output
        [line] = error_lines(failed.stderr)
        assert "cannot reach" in line or "stopped answering" in line, line
        status = vault.cli("status", through_worker=False)
        assert status.returncode == 1 and "primary repository cannot be read" in status.stderr, status.output
    finally:
        buckets.start()
    # A pull killed while it copies (the vault's restic slowed to 16 KiB/s so it is caught in the act).
    slow = tmp_path / "slow-restic"
    slow.mkdir()
    (slow / "restic").write_text(f'#!/bin/sh\nexec {restic_bin} --limit-download 16 --limit-upload 16 "$@"\n')
    (slow / "restic").chmod(0o755)
    env = {**vault.env, "PATH": f"{slow}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    process = subprocess.Popen([services.TMA_BACKUP, "vault", "pull"], env=env, cwd=vault.folder,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: _slowed_restic("copy"), timeout=60, what="the pull to start copying")
        time.sleep(1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # every restic of this pull (only this test slows restic so: another test's `restic copy` is not ours)
    wait_for(lambda: not _slowed_restic(""), what="the killed pull's restic to die with it")
    held = vault_repository(vault, tmp_path / "cache-vault")
    assert len(snapshots(restic_bin, held)) < 2, "killed before the set was whole in the vault"
    # consistent. The killed restic's lock is removed first: restic calls a lock of this host stale when its
    # PID no longer runs, but under a parallel suite (pid_max 32768, thousands of processes a minute) that PID
    # can belong to a new process within seconds, and the lock then looks held for 30 minutes. Nothing else
    # uses the vault here (no beat, the killed pull's processes are gone), so every lock goes, again before
    # each try (a listing's own lock may linger for a moment).
    deadline = time.monotonic() + 60
    while True:
        restic(restic_bin, held, "unlock", "--remove-all")
        checked = restic(restic_bin, held, "check", check=False)
        if checked.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    locks = restic(restic_bin, held, "list", "locks", "--no-lock", check=False).stdout.split()
    assert checked.returncode == 0, (f"restic check of the vault after the killed pull: {checked.stderr[-800:]}\n"
                                     f"locks: {locks}\nprocesses: {_slowed_restic('')}")
    healed = vault.cli("vault", "pull", through_worker=False)
    assert healed.returncode == 0, healed.output
    parts = sorted(str(tag_value(item, "part:")) for item in snapshots(restic_bin, held))
    assert parts == ["database", "uploads"], parts
    assert restic(restic_bin, held, "check").returncode == 0
    assert vault.cli("status", through_worker=False).returncode == 0


def _slowed_restic(command: str) -> list[str]:
    """The restic processes running through this test's slowing wrapper (`command`: only those running it)."""
    found = subprocess.run(["pgrep", "-a", "-f", f"restic --limit-download 16 --limit-upload 16 .*{command}"],
                           capture_output=True, text=True)
    return found.stdout.splitlines()


def test_a_host_set_up_to_back_up_a_database_and_as_a_vault_refuses_to_start(pg, buckets, tmp_path):
    env = {**vault_env(tmp_path, buckets), "DB_HOST": "127.0.0.1", "DB_PASSWORD": "x", "UPLOAD_DIR": str(tmp_path)}
    worker = subprocess.run([services.sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"],
                            env={**env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    [line] = error_lines(worker.stderr)
    assert "both to back up a database" in line and "VAULT_REPOSITORY" in line, line
    assert "x" not in line.split("(")[1].split(")")[0].split(", "), "names the settings, not their values"
    cli = run_cli(["status"], env, tmp_path)
    assert cli.returncode == 2 and len(error_lines(cli.stderr)) == 1, cli.output


def test_the_vaults_time_rules_keep_every_real_set_whatever_back_dated_sets_arrive(buckets, restic_bin, tmp_path):
    """Real sets of the last 12 days in the vault, and as many sets with false dates, each the newest of a
    day (as if they had got through): the vault's upkeep (keep-within 90d, …) keeps every real one. A
    count rule (keep-daily 7, the primary's) would keep none of the real ones."""
    prefix = uuid.uuid4().hex[:8]
    env = {**vault_env(tmp_path, buckets), "VAULT_REPOSITORY": buckets.url(VAULT, prefix),
           "BACKUP_REPOSITORY": buckets.url(PRIMARY, prefix)}
    held = Repository(env["VAULT_REPOSITORY"], {}, _restic_env(env["VAULT_REPOSITORY"], VAULT_PASSWORD,
                                                               tmp_path / "cache", VAULT_IDENTITY.aws_env()), VAULT)
    restic(restic_bin, held, "init")
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.dump").write_bytes(os.urandom(1000))
    now = datetime.now(timezone.utc)

    def add(moment: datetime, kind: str) -> None:
        stamp = moment.strftime("%Y%m%dT%H%M%SZ")
        restic(restic_bin, held, "backup", "--time", moment.strftime("%Y-%m-%d %H:%M:%S"), "--tag",
               f"tma-backup,db:tma,server:pg-1,at:{stamp},part:database,{kind}", str(data))

    for day in range(12):
        add(now - timedelta(days=day, hours=1), "real")
    for number in range(12):  # each the newest of its day: under keep-daily they would take the real ones' place
        add(now - timedelta(days=number, minutes=30), "fake")
    result = run_cli(["vault", "list", "--json"], env, tmp_path)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 24, result.output
    from worker.settings import Settings
    from worker.vault.keep import maintain

    settings = Settings(_env_file=None, **{key: value for key, value in env.items() if key.isupper()})  # type: ignore[arg-type]
    maintain(settings, f"test-{uuid.uuid4()}")
    real = [item for item in snapshots(restic_bin, held) if "real" in item["tags"]]
    assert len(real) == 12, "every real set of the last 90 days stays"


def test_the_vaults_compose_file_is_valid_and_holds_nothing_of_the_database(tmp_path):
    """docker-compose.vault.yml as docker-compose reads it: a worker and one beat on a Redis of its own, no
    database, no uploads, no Docker socket, no published port."""
    compose = shutil.which("docker-compose")
    if compose is None:
        _unavailable("docker-compose not found: apt-get install docker-compose (or run docker/ci-setup.sh)")
    (tmp_path / ".env.vault").write_text("REDIS_PASSWORD=abc\n")
    shown = subprocess.run([str(compose), "-f", str(services.REPO / "docker-compose.vault.yml"), "--project-directory",
                            str(tmp_path), "config"], env={**os.environ, "REDIS_PASSWORD": "abc"}, cwd=tmp_path,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert sorted(service for service in ("redis", "worker", "beat", "vault-volumes") if f"  {service}:" in text) == \
        ["beat", "redis", "vault-volumes", "worker"]
    for absent in ("postgres", "docker.sock", "uploads", "DB_PASSWORD", "ports:", "flower"):
        assert absent not in text, absent
