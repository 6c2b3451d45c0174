"""Signed task messages (TASK_SIGNING_*): `tma-backup keys init`, a real worker and the real CLI with
signing on, and the messages such a worker must drop without running anything: unsigned ones (anyone who
can write to Redis), ones signed by a certificate that is not in its store, and ones signed with another
key under the name (issuer and serial number) of the real certificate."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests import services, tma_cloud
from tests.conftest import base_env, run_cli
from tests.flower_process import FlowerProcess
from tests.helpers import backups_in, error_lines, only_backup, wait_for
from tests.test_restore import change_live, digests, managed_databases
from tests.test_workers import client_app

BROKER_DB = 11
WORKER = "s@host-signed"
SETTINGS = ("TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE")
REJECTION_WAIT = 5.0  # seconds a rejected task is watched for any sign of having run


def _plain_env() -> dict[str, str]:
    """The test's environment without any signing settings (keys init needs no other setting)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TASK_SIGNING_")}


def keys_init(directory: Path, *args: str, umask: int = 0o022) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    process = subprocess.run([services.TMA_BACKUP, "keys", "init", "--dir", str(directory), *args], env=_plain_env(),
                             cwd=next(p for p in directory.parents if p.is_dir()), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             umask=umask, timeout=60)
    printed = dict(line.split("=", 1) for line in process.stdout.splitlines() if "=" in line)
    return process, printed


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    process, printed = keys_init(tmp_path_factory.mktemp("signing") / "keys")
    assert process.returncode == 0, process.stderr
    return printed


@pytest.fixture(scope="module")
def signed_worker(pg, redis_server, keys, tmp_path_factory) -> Iterator[services.WorkerProcess]:
    """A real worker with signing on, alone on its broker database."""
    directory = tmp_path_factory.mktemp("signed-worker")
    broker = f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    env = base_env(pg, directory / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-signed",
                   TEST_CWD=str(directory), **keys)
    worker = services.WorkerProcess(WORKER, env, directory / "worker.log").start()
    yield worker
    worker.stop()


@pytest.fixture
def signed_env(signed_worker: services.WorkerProcess, tma_db: str) -> dict[str, str]:
    return {**signed_worker.env, "DB_NAME": tma_db}


def _backup(env: dict[str, str], cwd: Path) -> Path:
    result = run_cli(["backup"], env, cwd)
    assert result.returncode == 0, result.output
    dump, _ = only_backup(Path(env["BACKUP_DIR"]), env["DB_NAME"])
    return dump


def _assert_never_ran(env: dict[str, str], worker: services.WorkerProcess, sent: dict[str, str],
                      token_hash: str, backups_before: list[Path], log_says: str, logged: list[str]) -> None:
    """The worker logged each message as dropped (`log_says`, with what identifies it: `logged`), and
    within REJECTION_WAIT nothing changed: no result, no token bound, no backup, no lock, nothing queued."""
    def rejections_logged() -> bool:
        # Each rejection, up to its traceback: the message's headers (task id) and body (arguments).
        entries = [entry.split("Traceback (most recent call last)")[0] for entry in worker.log().split(log_says)[1:]]
        return all(any(marker in entry for entry in entries) for marker in logged)

    wait_for(rejections_logged, timeout=20, what=f"the worker to log the rejections ({log_says!r}: {logged})")
    log = worker.log()
    time.sleep(REJECTION_WAIT)
    broker = env["CELERY_BROKER_URL"]
    app = client_app(broker)
    assert {task: AsyncResult(task_id, app=app).state for task, task_id in sent.items()} == \
        {task: "PENDING" for task in sent}, "a rejected task has no result: it never started"
    client = redis.Redis.from_url(broker)
    assert client.get(f"tma_backup:restore-token:{token_hash}") is None, "no restore token was bound"
    assert client.keys("tma_backup:lock:*") == []
    assert client.llen("tma_backup") == 0, "the messages were taken off the queue and dropped, not left for later"
    assert backups_in(Path(env["BACKUP_DIR"]), env["DB_NAME"]) == backups_before
    for task_id in sent.values():
        assert f"Task {task_id}" not in log and f"[{task_id}]" not in log, "no task ran"


def test_keys_init_makes_a_0600_key_a_certificate_and_a_store_and_never_overwrites(tmp_path):
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey

    directory = tmp_path / "new" / "keys"
    process, printed = keys_init(directory, "--days", "30", umask=0)  # a umask that takes nothing away
    assert process.returncode == 0, process.stderr
    assert set(printed) == set(SETTINGS) and process.stdout.count("\n") == 3, process.stdout
    key, cert, store = (Path(printed[name]) for name in SETTINGS)
    assert key.parent == cert.parent == store.parent == directory
    assert directory.stat().st_mode & 0o777 == 0o700
    assert key.stat().st_mode & 0o777 == 0o600
    assert cert.stat().st_mode & 0o777 == 0o644
    [stored] = list(store.iterdir())
    assert stored.read_bytes() == cert.read_bytes()

    # What Celery's auth serializer will load: an RSA key, its certificate, a store that holds it.
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
    PrivateKey(key.read_text())
    certificate = Certificate(cert.read_text())
    assert certificate.get_pubkey().public_numbers() == private.public_key().public_numbers()
    assert FSCertStore(str(store))[certificate.get_id()].get_serial_number() == certificate.get_serial_number()
    valid = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    assert abs(valid - datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)) < datetime.timedelta(hours=1)

    files = {path: path.read_bytes() for path in (key, cert, stored)}
    again, printed_again = keys_init(directory)
    assert again.returncode == 1 and printed_again == {}
    [line] = error_lines(again.stderr)
    assert "refusing to overwrite" in line and str(key) in line
    assert {path: path.read_bytes() for path in files} == files
    assert sorted(directory.rglob("*")) == sorted([key, cert, store, stored])

    # Any one of the three in the way is enough, and nothing is created beside it.
    other = tmp_path / "other"
    (other / "cert-store").mkdir(parents=True)
    refused, _ = keys_init(other)
    assert refused.returncode == 1 and len(error_lines(refused.stderr)) == 1
    assert sorted(other.rglob("*")) == [other / "cert-store"]


def test_partial_unreadable_or_unusable_signing_settings_are_one_line_and_exit_2(pg, redis_server, keys, tmp_path):
    key, cert, store = (keys[name] for name in SETTINGS)
    env = base_env(pg, tmp_path / "backups")

    def refused(*command: str, **settings: str) -> str:
        result = run_cli(list(command), {**env, **settings}, tmp_path)
        assert result.returncode == 2, result.output
        [line] = error_lines(result.stderr)
        assert "Traceback" not in result.output
        return line

    line = refused("list", TASK_SIGNING_KEY=key)
    assert "TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE are not set" in line
    line = refused("list", TASK_SIGNING_KEY=key, TASK_SIGNING_CERT=cert)
    assert "TASK_SIGNING_CERT_STORE is not set" in line and "TASK_SIGNING_KEY is" not in line
    line = refused("list", TASK_SIGNING_CERT_STORE=store)
    assert "TASK_SIGNING_KEY and TASK_SIGNING_CERT are not set" in line
    line = refused("list", TASK_SIGNING_KEY=str(tmp_path / "missing.key"), TASK_SIGNING_CERT=cert,
                   TASK_SIGNING_CERT_STORE=store)
    assert line.startswith("[ERROR] TASK_SIGNING_KEY: must be a readable PEM file (No such file or directory)")
    line = refused("list", TASK_SIGNING_KEY=key, TASK_SIGNING_CERT=store, TASK_SIGNING_CERT_STORE=store)
    assert line.startswith("[ERROR] TASK_SIGNING_CERT: must be a readable PEM file, not a folder")

    # A store that does not hold this process's own certificate: every process that loads the Celery
    # configuration (here the CLI, dispatching, and a worker starting) refuses with one line, exit 2.
    _, stranger = keys_init(tmp_path / "stranger")
    broker = {"CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB + 1}"}
    wrong_store = {"TASK_SIGNING_KEY": key, "TASK_SIGNING_CERT": cert,
                   "TASK_SIGNING_CERT_STORE": stranger["TASK_SIGNING_CERT_STORE"]}
    line = refused("backup", **broker, **wrong_store)
    assert "TASK_SIGNING_CERT_STORE" in line and "does not hold TASK_SIGNING_CERT" in line
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", "refused@host"],
                            env={**env, **broker, **wrong_store}, cwd=services.REPO, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert worker.returncode == 2 and error_lines(worker.stderr) == [line], worker.stderr[-2000:]
    # A key that is not the certificate's.
    line = refused("backup", **broker, TASK_SIGNING_KEY=stranger["TASK_SIGNING_KEY"], TASK_SIGNING_CERT=cert,
                   TASK_SIGNING_CERT_STORE=store)
    assert "is not the certificate of TASK_SIGNING_KEY" in line


def test_with_signing_the_real_cli_and_worker_back_up_and_restore(pg, admin, signed_env, signed_worker, tma_db,
                                                                  tmp_path):
    log_before = len(signed_worker.log())
    dump = _backup(signed_env, tmp_path)  # the CLI's kickoff and ping, the worker's five links: all signed
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    assert digests(pg, tma_db) != at_backup
    prepared = run_cli(["restore", str(dump), "--prepare"], signed_env, tmp_path)
    assert prepared.returncode == 0, prepared.output
    restored = run_cli(["restore", "--token", prepared.stdout.strip(), "--confirm", tma_db], signed_env, tmp_path)
    assert restored.returncode == 0, restored.output
    assert digests(pg, tma_db) == at_backup
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)
    log = signed_worker.log()[log_before:]
    assert "Received invalid task message" not in log and "Can't decode message body" not in log


def test_an_unsigned_message_is_dropped_and_changes_nothing(signed_env, signed_worker, tmp_path):
    dump = _backup(signed_env, tmp_path)
    before = backups_in(Path(signed_env["BACKUP_DIR"]), signed_env["DB_NAME"])
    token_hash = hashlib.sha256(secrets.token_urlsafe(24).encode()).hexdigest()
    app = client_app(signed_env["CELERY_BROKER_URL"])  # plain JSON: what anyone who can write to Redis sends
    sent = {
        "tma_backup.restore_prepare": app.send_task("tma_backup.restore_prepare",
                                                    kwargs={"file": str(dump), "token_hash": token_hash}).id,
        "tma_backup.backup": app.send_task("tma_backup.backup", kwargs={"database": signed_env["DB_NAME"]}).id,
    }
    # The worker's log shows each rejected message's body (protocol 2: its arguments, not its task id).
    _assert_never_ran(signed_env, signed_worker, sent, token_hash, before,
                      "Refusing to deserialize untrusted content of type json",
                      [f'"token_hash": "{token_hash}"', f'{{"database": "{signed_env["DB_NAME"]}"}}'])


FORGER = textwrap.dedent("""
    import json, sys
    from celery import Celery

    broker, key, cert, store, kwargs = sys.argv[1:6]
    app = Celery("forger", broker=broker, backend=broker)
    app.conf.update(task_serializer="auth", accept_content=["auth"], result_accept_content=["json"],
                    task_default_queue="tma_backup", security_key=key, security_certificate=cert,
                    security_cert_store=store)
    app.setup_security(allowed_serializers=["json"])
    kwargs = json.loads(kwargs)
    print(json.dumps({name: app.send_task(name, kwargs=kwargs[name]).id for name in kwargs}))
""")


def _impersonating(keys: dict[str, str], directory: Path) -> tuple[Path, Path]:
    """Another key, in a certificate with the real one's subject, issuer and serial number: what someone who
    copied the (public) certificate from a cert store could make."""
    real = x509.load_pem_x509_certificate(Path(keys["TASK_SIGNING_CERT"]).read_bytes())
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = datetime.datetime.now(datetime.UTC)
    forged = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.issuer)
              .public_key(private.public_key()).serial_number(real.serial_number)
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
              .sign(private, hashes.SHA256()))
    directory.mkdir()
    key, cert = directory / "forged.key", directory / "forged.crt"
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.mark.parametrize("signer", ["own certificate", "the real certificate's name"])
def test_a_message_signed_by_anyone_not_in_the_cert_store_is_dropped(signer, keys, signed_env, signed_worker, tmp_path):
    if signer == "own certificate":
        process, other = keys_init(tmp_path / "other")
        assert process.returncode == 0, process.stderr
        key, cert = Path(other["TASK_SIGNING_KEY"]), Path(other["TASK_SIGNING_CERT"])
        why = "Unknown certificate"
    else:
        key, cert = _impersonating(keys, tmp_path / "forged")
        # The signature does not verify. Celery 5.7 then fails to catch cryptography's InvalidSignature (it
        # names the module, not the class: celery/celery#5553) and logs a TypeError instead of "Bad signature";
        # the message is dropped all the same.
        why = "Unable to deserialize"
    dump = _backup(signed_env, tmp_path)
    before = backups_in(Path(signed_env["BACKUP_DIR"]), signed_env["DB_NAME"])
    token_hash = hashlib.sha256(secrets.token_urlsafe(24).encode()).hexdigest()
    kwargs = {"tma_backup.restore_prepare": {"file": str(dump), "token_hash": token_hash},
              "tma_backup.backup": {"database": signed_env["DB_NAME"]}}
    forger = subprocess.run([sys.executable, "-c", FORGER, signed_env["CELERY_BROKER_URL"], str(key), str(cert),
                             str(cert), json.dumps(kwargs)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, env=_plain_env())
    assert forger.returncode == 0, forger.stderr
    sent = json.loads(forger.stdout)
    # The worker's log names each rejected message by its headers (its task id); the body stays signed.
    _assert_never_ran(signed_env, signed_worker, sent, token_hash, before,
                      "Can't decode message body: DecodeError(SecurityError(", list(sent.values()))
    rejections = signed_worker.log().split("Can't decode message body: ")[-2:]
    assert all(why in rejection.split("\n", 1)[0] for rejection in rejections), rejections


def test_flower_with_signing_shows_the_signed_chain_and_the_worker(signed_env, signed_worker, tmp_path):
    """Flower signs its control messages (it inspects workers) with the same settings; events stay JSON."""
    flower = FlowerProcess(signed_env, tmp_path / "flower.log", tmp_path).start()
    try:
        wait_for(lambda: flower.sees_worker(WORKER), timeout=30, what="Flower to receive the worker's events")
        _backup(signed_env, tmp_path)

        def chain_done() -> bool:
            states = {task["name"]: task["state"] for task in flower.tasks().values()}
            return states.get("tma_backup.prune") == "SUCCESS" and states.get("tma_backup.backup") == "SUCCESS"

        wait_for(chain_done, timeout=20, what="Flower to show the signed chain")
        conf = flower.get_json("/api/workers?refresh=1")[WORKER]["conf"]  # a signed inspect, a signed reply
        assert conf["task_serializer"] == "auth" and conf["accept_content"] == ["auth"]
        assert conf["result_accept_content"] == ["json"] and conf["event_serializer"] == "json"
    finally:
        flower.stop()
