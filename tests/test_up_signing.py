"""Secure by default: `docker/up.sh` makes the task-signing key, its certificate and a cert store (as
`tma-backup keys init` makes them) when it makes the passwords, and the env file's three TASK_SIGNING_*
settings name them, so that a fresh stack signs and checks every task message. Never overwritten: a rerun
changes nothing; an env file without the settings gets them appended, saying so.

Proved against real things: the env file `up.sh --env-only` writes is the settings of a real worker (on
the session's Redis), which drops an unsigned message and answers the CLI's signed ones; the compose
stack's own worker (the local Docker engine, the images `docker/ci-setup.sh` builds) reads the copy its
one-shot `task-signing` service makes as uid 1000, and drops an unsigned message sent through the stack's
published Redis port. Without Docker, openssl makes what Celery's signing accepts."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis
from celery.exceptions import SecurityError
from celery.result import AsyncResult
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests import services
from tests.conftest import base_env, run_cli
from tests.helpers import backups_in, error_lines, wait_for
from tests.test_compose import (  # noqa: F401  (docker_compose, docker_engine: fixtures)
    REPO,
    Compose,
    _clean_environ,
    _env_values,
    _write_env_file,
    docker_compose,
    docker_engine,
)
from tests.test_workers import client_app
from worker.coordination import signing
from worker.settings import Settings

UP = REPO / "docker" / "up.sh"
SETTINGS = ("TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE")
BROKER_DB = 1  # the session Redis's database for this module's worker (tests/test_repository.py: 0, 3-15 are used)
REFUSED = "Refusing to deserialize untrusted content of type json"


def up_env_only(env_file: Path, cwd: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(UP), "--env-only", "--env-file", str(env_file)], env={**_clean_environ(), **environ},
                          cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180)


def signing_settings(env_file: Path) -> dict[str, str]:
    values = _env_values(env_file)
    return {name: values[name] for name in SETTINGS}


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under `folder`: inode, mode and content (folders: empty)."""
    return {str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mode,
                                           path.read_bytes() if path.is_file() else b"")
            for path in [folder, *sorted(folder.rglob("*"))]}


def checked(env_file: Path) -> Settings:
    """The settings the env file gives a process, as every worker, beat, Flower and CLI checks them."""
    settings = Settings(_env_file=str(env_file))  # type: ignore[call-arg]
    assert settings.signing
    assert signing.check(settings) == [], "no warning: the key is 0600 and far from expiring"
    return settings


def test_a_fresh_env_file_gets_a_signing_key_that_a_real_worker_checks_and_a_rerun_changes_nothing(
        pg, redis_server, tmp_path):
    env_file = tmp_path / "settings.env"
    made = up_env_only(env_file, tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "task-signing"
    assert signing_settings(env_file) == {"TASK_SIGNING_KEY": f"{folder}/task-signing.key",
                                          "TASK_SIGNING_CERT": f"{folder}/task-signing.crt",
                                          "TASK_SIGNING_CERT_STORE": f"{folder}/cert-store"}
    assert f"task-signing: a new key made in {folder}" in made.stderr and "appending" not in made.stderr
    # As `keys init` makes them: the folder 0700, the key 0600, the certificate in the store.
    key, cert, store = folder / "task-signing.key", folder / "task-signing.crt", folder / "cert-store"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    [stored] = list(store.iterdir())
    assert stored.read_bytes() == cert.read_bytes() and stored.name.startswith("tma-backup-")
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert key.read_text() not in made.stderr and "PRIVATE KEY" not in made.stderr
    checked(env_file)

    # Run again: not a byte, mode or inode changes, and no new key is made.
    before, env_before = snapshot(folder), env_file.read_bytes()
    again = up_env_only(env_file, tmp_path)
    assert again.returncode == 0, again.stderr
    assert snapshot(folder) == before and env_file.read_bytes() == env_before
    assert "task-signing" not in again.stderr and "appending" not in again.stderr, again.stderr

    # A real worker with these settings: the CLI's signed messages are answered, an unsigned one is dropped.
    broker = f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    (tmp_path / "backups").mkdir(mode=0o700)
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-up-signing",
                   TEST_CWD=str(tmp_path), **signing_settings(env_file))
    worker = services.WorkerProcess("up@host-up-signing", env, tmp_path / "worker.log").start()
    try:
        listed = run_cli(["list"], env, tmp_path, timeout=120)
        assert listed.returncode == 0 and "on host-up-signing" in listed.stderr, listed.output
        forged = client_app(broker).send_task("tma_backup.backup", kwargs={"database": "tma_cloud_storage"})
        wait_for(lambda: REFUSED in worker.log(), timeout=20, what="the worker to drop the unsigned message")
        time.sleep(3)
        assert AsyncResult(forged.id, app=client_app(broker)).state == "PENDING", "it never ran"
        assert forged.id not in worker.log() and backups_in(tmp_path / "backups", "tma_cloud_storage") == []
        assert redis.Redis.from_url(broker).llen("tma_backup") == 0, "taken off the queue and dropped"
    finally:
        worker.stop()


def test_an_env_file_without_signing_settings_gets_them_appended_and_says_so(tmp_path):
    existing = tmp_path / "existing.env"
    settings = _write_env_file(existing, "tmaupsign")
    with open(existing, "a") as handle:
        handle.write("# the operator's last line, without its newline")
    before = existing.read_text()
    result = up_env_only(existing, tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "task-signing"
    assert (f"{existing} has no TASK_SIGNING_KEY, TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE: appending the "
            f"three for a new key made in {folder}") in result.stderr, result.stderr
    after = existing.read_text()
    assert after == before + "\n" + "".join(f"{name}={value}\n" for name, value in signing_settings(existing).items())
    assert signing_settings(existing)["TASK_SIGNING_KEY"] == f"{folder}/task-signing.key"
    assert _env_values(existing)["REDIS_PASSWORD"] == settings["REDIS_PASSWORD"], "nothing else changes"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600, "the file keeps its mode"
    checked(existing)
    made = snapshot(folder)

    # Another env file beside it, without the settings: the key already there is named, never remade.
    second = tmp_path / "second.env"
    _write_env_file(second, "tmaupsign2")
    reused = up_env_only(second, tmp_path)
    assert reused.returncode == 0, reused.stderr
    assert f"appending the three for the key already in {folder}, kept as it is" in reused.stderr
    assert signing_settings(second) == signing_settings(existing) and snapshot(folder) == made

    # Refused, naming what is wrong, and nothing changes: some of the three only, one naming nothing.
    key_line, store_line = f"TASK_SIGNING_KEY={folder}/task-signing.key\n", f"TASK_SIGNING_CERT_STORE={folder}/cert-store\n"
    (tmp_path / "empty-store").mkdir()
    for broken, says in ((after.replace(key_line, ""), "but not all three of TASK_SIGNING_KEY"),
                         (after.replace(key_line, f"TASK_SIGNING_KEY={folder}/gone.key\n"),
                          f"TASK_SIGNING_KEY in {existing} names {folder}/gone.key, which is not a file"),
                         (after.replace(store_line, f"TASK_SIGNING_CERT_STORE={tmp_path}/empty-store\n"),
                          "which holds no certificate"),
                         (after.replace(key_line, "TASK_SIGNING_KEY=task-signing/task-signing.key\n"),
                          "must be an absolute path")):
        existing.write_text(broken)
        refused = up_env_only(existing, tmp_path)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
        assert existing.read_text() == broken and snapshot(folder) == made

    # A task-signing folder holding part of a key set: never completed, never overwritten.
    other = tmp_path / "other"
    (other / "task-signing" / "cert-store").mkdir(parents=True)
    _write_env_file(other / "settings.env", "tmaupsign3")
    kept = (other / "settings.env").read_bytes()
    refused = up_env_only(other / "settings.env", other)
    assert refused.returncode != 0 and "refusing to overwrite or complete them" in refused.stderr, refused.stderr
    assert (other / "settings.env").read_bytes() == kept
    assert sorted(path.name for path in (other / "task-signing").rglob("*")) == ["cert-store"]


def test_without_docker_the_key_is_made_all_the_same(tmp_path):
    """--env-only needs no Docker: with none answering, this machine's tma-backup makes the key; with
    neither, openssl makes what Celery's signing accepts (a signed message verifies, a forged one not)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    path = f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    (tmp_path / "a").mkdir()
    result = up_env_only(tmp_path / "a" / ".env", tmp_path / "a", PATH=path)
    assert result.returncode == 0, result.stderr
    assert f"a new key made in {tmp_path / 'a' / 'task-signing'} with tma-backup" in result.stderr, result.stderr
    checked(tmp_path / "a" / ".env")

    (tmp_path / "b").mkdir()
    result = up_env_only(tmp_path / "b" / ".env", tmp_path / "b", PATH=path, UP_SIGNING_TOOL="openssl")
    assert result.returncode == 0, result.stderr
    assert "with openssl" in result.stderr
    folder = tmp_path / "b" / "task-signing"
    assert sorted(path.name for path in folder.iterdir()) == ["cert-store", "task-signing.crt", "task-signing.key"]
    assert stat.S_IMODE((folder / "task-signing.key").stat().st_mode) == 0o600
    settings = checked(tmp_path / "b" / ".env")
    certificate = x509.load_pem_x509_certificate((folder / "task-signing.crt").read_bytes())
    assert certificate.public_key().key_size == 3072  # type: ignore[union-attr]
    [stored] = list((folder / "cert-store").iterdir())
    assert stored.name == f"tma-backup-{certificate.fingerprint(hashes.SHA256()).hex()[:16]}.crt", \
        "named as `keys init` names it"
    # Celery's own signing: a message signed with the key verifies; one signed by another key does not.
    (tmp_path / "c").mkdir()
    assert up_env_only(tmp_path / "c" / ".env", tmp_path / "c", UP_SIGNING_TOOL="openssl").returncode == 0
    ours, stranger = _serializer(settings, settings), _serializer(checked(tmp_path / "c" / ".env"), settings)
    assert ours.deserialize(ours.serialize({"task": "tma_backup.backup"})) == {"task": "tma_backup.backup"}
    with pytest.raises(SecurityError):
        ours.deserialize(stranger.serialize({"task": "tma_backup.restore"}))


def _serializer(signer: Settings, checker: Settings) -> SecureSerializer:
    """Celery's `auth` serializer signing with `signer`'s key and checking against `checker`'s cert store."""
    return SecureSerializer(key=PrivateKey(Path(str(signer.TASK_SIGNING_KEY)).read_text()),
                            cert=Certificate(Path(str(signer.TASK_SIGNING_CERT)).read_text()),
                            cert_store=FSCertStore(str(checker.TASK_SIGNING_CERT_STORE)), digest="sha256",
                            serializer="json")


def test_the_stacks_worker_reads_its_copy_of_the_key_as_uid_1000_and_drops_an_unsigned_message(
        docker_engine, tmp_path):
    project = f"tmaupsig{secrets.token_hex(4)}"
    env_file = tmp_path / "settings.env"
    made = up_env_only(env_file, tmp_path)
    assert made.returncode == 0, made.stderr
    with open(env_file, "a") as handle:
        handle.write(f"COMPOSE_PROJECT_NAME={project}\n")
    (tmp_path / "uploads").mkdir()
    host_key = Path(signing_settings(env_file)["TASK_SIGNING_KEY"])
    compose = Compose(tmp_path, env_file, project)
    try:
        # The worker alone (with Redis and the one-shot services it waits for): no fixed container name.
        up = compose("up", "-d", "--no-build", "redis", "worker", timeout=300)
        assert up.returncode == 0, up.stderr
        wait_for(lambda: compose.exec("worker", "celery", "-A", "worker", "inspect", "ping").returncode == 0,
                 timeout=90, what="the stack's worker to answer the broker (signed)")
        copied = compose.exec("worker", "sh", "-c", "id -u; stat -c '%n %u %a' /run/tma-signing "
                              "/run/tma-signing/task-signing.key /run/tma-signing/task-signing.crt "
                              "/run/tma-signing/cert-store /run/tma-signing/cert-store/*; printenv TASK_SIGNING_KEY")
        assert copied.returncode == 0, copied.stderr
        lines = copied.stdout.splitlines()
        assert lines[0] == "1000" and lines[-1] == "/run/tma-signing/task-signing.key", lines
        modes = {name: f"{uid} {mode}" for name, uid, mode in (line.rsplit(" ", 2) for line in lines[1:-1])}
        assert modes["/run/tma-signing"] == "1000 700" and modes["/run/tma-signing/task-signing.key"] == "1000 400"
        assert modes["/run/tma-signing/task-signing.crt"] == "1000 444" and len(modes) == 5, modes
        same = compose.exec("worker", "cat", "/run/tma-signing/task-signing.key")
        assert same.stdout == host_key.read_text(), "the key the worker reads is the host's"
        assert stat.S_IMODE(host_key.stat().st_mode) == 0o600 and host_key.stat().st_uid == os.getuid(), \
            "the host's key stays as it was"
        conf = compose.exec("worker", "celery", "-A", "worker", "inspect", "conf")
        assert '"task_serializer": "auth"' in conf.stdout and "Refusing" not in conf.stdout, conf.stdout[-2000:]
        listed = compose.exec("worker", "tma-backup", "list")
        assert listed.returncode == 0 and "No backups yet." in listed.stderr, listed.stdout + listed.stderr

        # What anyone who can write to the stack's Redis sends: dropped, never run.
        host, _, port = compose("port", "redis", "6379").stdout.strip().rpartition(":")
        broker = f"redis://:{_env_values(env_file)['REDIS_PASSWORD']}@{host}:{port}/0"
        forged = client_app(broker).send_task("tma_backup.backup", kwargs={"database": "tma_cloud_storage"})
        wait_for(lambda: REFUSED in compose("logs", "--no-color", "worker").stdout, timeout=30,
                 what="the stack's worker to drop the unsigned message")
        time.sleep(3)
        assert AsyncResult(forged.id, app=client_app(broker)).state == "PENDING"
        assert forged.id not in compose("logs", "--no-color", "worker").stdout
        assert compose.exec("worker", "ls", "-A", "/backups").stdout.strip() == ""

        # Without the settings, the stack's signing copy refuses with one line, and nothing signs unsigned.
        bare = tmp_path / "bare.env"
        _write_env_file(bare, project)
        refused = Compose(tmp_path, bare, project)("run", "--rm", "-T", "task-signing", timeout=120)
        assert refused.returncode == 1, refused
        [line] = [line for line in refused.stderr.splitlines() if line.startswith("task-signing:")]
        assert "the key (TASK_SIGNING_KEY) is unset or not a file" in line and "docker/up.sh makes them" in line
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180)
        assert down.returncode == 0, down.stderr
    assert error_lines(made.stderr) == []
