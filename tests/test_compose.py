"""docker-compose.yml for real: it validates, and the stack comes up on the local Docker engine from
locally built images (docker/up.sh) and runs one backup end to end, then goes away (`down -v`). Its
Redis requires REDIS_PASSWORD, and no password shows in any process's argv, in Flower or in the logs.
The backup lands a set in the stack's default repository (/repository, its own volume, which up.sh
creates once with a generated BACKUP_REPOSITORY_PASSWORD), with the uploads folder and the settings
file, and `tma-backup status` reports it.

Joined to "TMA Cloud's own stack" (docker-compose.tma.yml, `docker/up.sh --join`): TMA's stack is
played by hand with `docker run`, as its docker-compose.yml lays it out (tma-local/postgres:18 as
tma-cloud-postgres, a Redis answering to `redis`, on `<project>_tma-cloud-network`; a folder with its
.env and uploads/ owned by TMA's uid 1001); our stack backs up its database, uploads and .env, then
restores database and uploads together into the bind-mounted folder, with the worker image's own
PostgreSQL 18 tools over TMA's network (DB_MODE=host) and no Docker socket in the worker (`docker
inspect`). A TMA Cloud server newer than the image's newest tools is refused by up.sh at start.

Every run uses a throwaway settings file and project folder under tmp_path (never a `.env` in the
repository: the settings read `.env` from the working directory), its own project name, and random
host ports. The stack's fixed container names (tma-cloud-postgres, tma-backup-beat) cannot be shared:
when another stack or test holds them, this test waits for them to go away.

Needs: docker.io, docker-compose and the images `docker/ci-setup.sh` builds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import services
from tests.conftest import _unavailable

REPO = services.REPO
COMPOSE_FILE = REPO / "docker-compose.yml"
JOIN_FILE = REPO / "docker-compose.tma.yml"
DOCKER_MODE_FILE = REPO / "docker-compose.docker-mode.yml"
FIXED_NAMES = ("tma-cloud-postgres", "tma-backup-beat")
BASE_IMAGES = ("tma-local/postgres:15", "tma-local/redis:7", "tma-local/worker-base:latest")
# TMA Cloud's files table (the columns the cross-check reads: UPLOADS_REFERENCES_QUERY's default)
TMA_FILES = ("CREATE TABLE files (id text PRIMARY KEY, name text, type text NOT NULL, size bigint, path text, "
             "deleted_at timestamptz)")
CHAIN = ("tma_backup.dump", "tma_backup.verify", "tma_backup.checksum", "tma_backup.meta", "tma_backup.offsite",
         "tma_backup.prune")


def _run(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    if "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def _write_env_file(path: Path, project: str, omit: tuple[str, ...] = ()) -> dict[str, str]:
    """A throwaway settings file (mode 600) with fresh random passwords."""
    settings = {
        "DB_USER": "postgres", "DB_PASSWORD": f"dbpw-{secrets.token_hex(8)}", "DB_NAME": "tma_cloud_storage",
        "BACKUP_RETAIN_COUNT": "3", "FLOWER_USER": "admin", "FLOWER_PASSWORD": f"flpw-{secrets.token_hex(8)}",
        "REDIS_PASSWORD": f"rdpw-{secrets.token_hex(8)}", "COMPOSE_PROJECT_NAME": project,
        "BACKUP_REPOSITORY_PASSWORD": f"rppw-{secrets.token_hex(8)}",
    }
    settings = {key: value for key, value in settings.items() if key not in omit}
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    path.chmod(0o600)
    return settings


class Compose:
    """docker-compose with the repository's file (and, joined, docker-compose.tma.yml), a throwaway folder
    and settings file, and its own name."""

    def __init__(self, folder: Path, env_file: Path, project: str, files: tuple[Path, ...] = (COMPOSE_FILE,),
                 **environ: str) -> None:
        self.folder, self.env_file, self.project, self.files = folder, env_file, project, files
        self.environ = {**_clean_environ(), "TMA_ENV_FILE": str(env_file), "REDIS_HOST_PORT": "0",
                        "FLOWER_HOST_PORT": "0", **environ}

    def args(self, *args: str) -> list[str]:
        files = [item for path in self.files for item in ("-f", str(path))]
        return ["docker-compose", *files, "--project-directory", str(self.folder),
                "--env-file", str(self.env_file), "-p", self.project, *args]

    def __call__(self, *args: str, timeout: float = 120, **environ: str) -> subprocess.CompletedProcess[str]:
        return _run(self.args(*args), timeout=timeout, env={**self.environ, **environ}, cwd=self.folder)

    def exec(self, service: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self("exec", "-T", service, *command, timeout=timeout)


def _clean_environ() -> dict[str, str]:
    """No inherited settings: the stack's must come from its settings file only."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("DB_", "BACKUP_", "CELERY_", "FLOWER_", "COMPOSE_", "TMA_", "REDIS_"))}


def _config(compose: Compose) -> dict[str, Any]:
    """`docker-compose config`, parsed with the YAML module docker-compose itself runs on."""
    result = compose("config")
    assert result.returncode == 0, result.stderr
    parsed = _run(["/usr/bin/python3", "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                  input=result.stdout)
    assert parsed.returncode == 0, parsed.stderr
    return dict(json.loads(parsed.stdout))


@pytest.fixture(scope="module")
def docker_compose() -> None:
    if not shutil.which("docker-compose"):
        _unavailable("docker-compose not found: apt-get install docker-compose (or run docker/ci-setup.sh)")


@pytest.fixture(scope="module")
def docker_engine(docker_compose: None) -> None:
    if not shutil.which("docker"):
        _unavailable("docker not found: run docker/ci-setup.sh (installs docker.io and builds the images)")
    if _run(["docker", "info"], timeout=30).returncode != 0:
        _unavailable("the Docker engine does not answer: run docker/ci-setup.sh (starts dockerd)")
    missing = [image for image in BASE_IMAGES if _run(["docker", "image", "inspect", image]).returncode != 0]
    if missing:
        _unavailable(f"images {', '.join(missing)} are missing: run docker/ci-setup.sh")


def test_the_compose_file_validates_and_has_the_documented_shape(docker_compose, tmp_path):
    project = f"tmacfg{secrets.token_hex(4)}"
    settings = _write_env_file(tmp_path / "settings.env", project)
    config = _config(Compose(tmp_path, tmp_path / "settings.env", project))
    services_ = config["services"]
    assert sorted(services_) == ["beat", "flower", "postgres", "redis", "repository-volume", "task-signing",
                                 "tma-config", "worker"]

    postgres = services_["postgres"]
    assert postgres["container_name"] == "tma-cloud-postgres" and "healthcheck" in postgres
    assert postgres["environment"]["POSTGRES_PASSWORD"] == settings["DB_PASSWORD"]
    worker = services_["worker"]
    assert "-E" in worker["command"].split() and worker["user"] == "1000:1000"
    assert worker["build"]["dockerfile"] == "Dockerfile"
    assert any(volume.startswith("backups:/backups") for volume in worker["volumes"])
    assert "backups" in config["volumes"]
    assert worker["environment"]["DB_PASSWORD"] == settings["DB_PASSWORD"], "settings come from the env file"
    # exactly one beat: a fixed container name, so `--scale beat=2` cannot start a second one
    assert services_["beat"]["container_name"] == "tma-backup-beat" and "beat" in services_["beat"]["command"]
    flower = services_["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == f"admin:{settings['FLOWER_PASSWORD']}"
    assert settings["FLOWER_PASSWORD"] not in flower["command"], "credentials stay out of argv"
    published = [str(port) for name in ("flower", "redis") for port in services_[name]["ports"]]
    assert published and all(port.startswith("127.0.0.1:") for port in published), published
    broker = f"redis://:{settings['REDIS_PASSWORD']}@redis:6379/0"
    for name in ("worker", "beat", "flower"):
        assert services_[name]["image"] == "tma-local/tma-backup-worker:latest"
        assert services_[name]["environment"]["CELERY_BROKER_URL"] == broker
        assert services_[name]["environment"]["CELERY_RESULT_BACKEND"] == broker
    # Redis requires the password; it reaches redis-server (on stdin) and redis-cli through the environment.
    broker_service = services_["redis"]
    assert broker_service["environment"]["REDISCLI_AUTH"] == settings["REDIS_PASSWORD"]
    assert "requirepass" in " ".join(broker_service["entrypoint"])
    assert "redis-cli" in " ".join(broker_service["healthcheck"]["test"])
    # No password in anything that becomes a process's argv: commands, entrypoints, healthchecks.
    passwords = [settings[key] for key in ("DB_PASSWORD", "FLOWER_PASSWORD", "REDIS_PASSWORD",
                                           "BACKUP_REPOSITORY_PASSWORD")]
    argv = json.dumps({name: [service.get(key) for key in ("command", "entrypoint", "healthcheck")]
                       for name, service in services_.items()})
    assert not [password for password in passwords if password in argv], "passwords stay out of argv"


    # The repository: by default /repository, a volume of its own that only the worker mounts, made uid 1000's
    # by a one-shot root service before the worker starts; its password from the env file, never in Flower.
    assert "repository" in config["volumes"]
    assert "repository:/repository:rw" in worker["volumes"] and "backups:/backups:rw" in worker["volumes"]
    assert worker["depends_on"]["repository-volume"] == {"condition": "service_completed_successfully"}
    for name in ("beat", "flower"):
        assert not [volume for volume in services_[name].get("volumes", []) if "repository" in volume], name
    owner = services_["repository-volume"]
    assert owner["user"] == "0:0" and owner["network_mode"] == "none" and owner["restart"] == "no"
    assert owner["volumes"] == ["repository:/repository:rw"] and "chown 1000:1000 /repository" in owner["entrypoint"][-1]
    for name in ("worker", "beat"):
        assert services_[name]["environment"]["BACKUP_REPOSITORY"] == "/repository"
        assert services_[name]["environment"]["BACKUP_REPOSITORY_PASSWORD"] == settings["BACKUP_REPOSITORY_PASSWORD"]
    assert {key: value for key, value in flower["environment"].items() if key.startswith("BACKUP_REPOSITORY")} == {
        "BACKUP_REPOSITORY": "", "BACKUP_REPOSITORY_PASSWORD": "", "BACKUP_REPOSITORY_PASSWORD_FILE": "",
        "BACKUP_REPOSITORY_ACCESS_KEY_ID": "", "BACKUP_REPOSITORY_SECRET_ACCESS_KEY": ""}, "Flower never has them"
    # .env names another repository (a bucket), or none at all (empty: backups stay local).
    for address in ("s3:https://s3.example.com/bucket/tma", ""):
        _write_env_file(tmp_path / "s3.env", project)
        with open(tmp_path / "s3.env", "a") as handle:
            handle.write(f"BACKUP_REPOSITORY={address}\n")
        other = _config(Compose(tmp_path, tmp_path / "s3.env", project))["services"]
        assert other["worker"]["environment"]["BACKUP_REPOSITORY"] == address
        assert other["beat"]["environment"]["BACKUP_REPOSITORY"] == address

    # TMA Cloud's uploads at its own /app/uploads, read-only; the configuration for the sets copied by a
    # one-shot root service (the settings file may be root's and 0600) into a volume, uid 1000's and 0400;
    # at least two worker processes; no wait on this file's postgres (the join file leaves it out).
    assert worker["command"].split()[-1] == "--concurrency=2"
    assert f"{tmp_path}/uploads:/app/uploads:ro" in worker["volumes"], worker["volumes"]
    assert "tma-config:/run/tma-config:ro" in worker["volumes"] and "tma-config" in config["volumes"]
    assert worker["environment"]["UPLOAD_DIR"] == "/app/uploads"
    assert worker["environment"]["TMA_ENV_FILE"] == "/run/tma-config/.env"
    assert worker["depends_on"] == {"redis": {"condition": "service_healthy"},
                                    "repository-volume": {"condition": "service_completed_successfully"},
                                    "tma-config": {"condition": "service_completed_successfully"},
                                    "task-signing": {"condition": "service_completed_successfully"}}
    copier = services_["tma-config"]
    assert copier["user"] == "0:0" and copier["network_mode"] == "none" and copier["restart"] == "no"
    assert copier["volumes"] == [f"{tmp_path / 'settings.env'}:/source/.env:ro", "tma-config:/config:rw"]
    assert "install -o 1000 -g 1000 -m 0400 /source/.env" in copier["entrypoint"][-1]
    for name in ("beat", "flower"):
        assert not [volume for volume in services_[name].get("volumes", []) if "uploads" in volume or "tma-config" in volume]
        assert "UPLOAD_DIR" not in services_[name]["environment"], name
    # The documented switches: the uploads writable for a restore, another folder, more processes.
    switched = _config(Compose(tmp_path, tmp_path / "settings.env", project, TMA_UPLOADS_MODE="rw",
                               TMA_UPLOADS_DIR="/srv/tma/uploads", WORKER_CONCURRENCY="4"))["services"]["worker"]
    assert "/srv/tma/uploads:/app/uploads:rw" in switched["volumes"]
    assert switched["command"].split()[-1] == "--concurrency=4"

    # Without a password the file refuses to resolve, naming the variable.
    for variable in ("DB_PASSWORD", "REDIS_PASSWORD"):
        _write_env_file(tmp_path / "nopw.env", project, omit=(variable,))
        refused = Compose(tmp_path, tmp_path / "nopw.env", project)("config", "-q")
        assert refused.returncode != 0 and variable in refused.stderr, variable


TMA_NETWORK_SUFFIX = "_tma-cloud-network"  # TMA Cloud's docker-compose.yml names its network tma-cloud-network


def _tma_env(path: Path, key: str, password: str) -> dict[str, str]:
    """TMA Cloud's own .env, as its .env.example lays it out (mode 600, root's: what the worker cannot read)."""
    settings = {"NODE_ENV": "production", "BPORT": "3000", "DB_HOST": "localhost", "DB_PORT": "5432",
                "DB_USER": "postgres", "DB_PASSWORD": password, "DB_NAME": "tma_cloud_storage", "DB_SSLMODE": "disable",
                "JWT_SECRET": f"jwt-{secrets.token_hex(8)}", "STORAGE_DRIVER": "local", "UPLOAD_DIR": "/app/uploads",
                "FILE_ENCRYPTION_KEY": key, "REDIS_HOST": "localhost", "REDIS_PORT": "6379",
                "REDIS_PASSWORD": f"tmaredis-{secrets.token_hex(8)}"}
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    path.chmod(0o600)
    return settings


def test_the_join_file_leaves_our_database_out_and_reads_tma_clouds_env_network_and_uploads(docker_compose, tmp_path):
    project = f"tmajcfg{secrets.token_hex(4)}"
    ours = _write_env_file(tmp_path / "settings.env", project)
    tma_dir = tmp_path / "tma"
    (tma_dir / "uploads").mkdir(parents=True)
    tma = _tma_env(tma_dir / ".env", f"key-{secrets.token_hex(16)}", f"tmapw-{secrets.token_hex(8)}")
    network = f"tmacloud{TMA_NETWORK_SUFFIX}"
    joined = dict(TMA_DIR=str(tma_dir), TMA_NETWORK=network)
    config = _config(Compose(tmp_path, tmp_path / "settings.env", project, (COMPOSE_FILE, JOIN_FILE), **joined))
    services_ = config["services"]

    # Our postgres (container name tma-cloud-postgres, TMA's own) is in a profile nothing activates.
    assert services_["postgres"]["profiles"] == ["own-database"]
    assert not [name for name, service in services_.items() if "postgres" in service.get("depends_on", {})]
    # The worker: TMA's database by its container's name on TMA's network, with the image's own client
    # tools (DB_MODE=host: no Docker socket, no docker group), TMA's .env winning over the stack's own
    # settings (its DB_PASSWORD, key), on TMA's network besides ours.
    worker = services_["worker"]
    environment = worker["environment"]
    assert {key: environment[key] for key in ("DB_HOST", "DB_PORT", "DB_MODE", "DB_CONTAINER")} == {
        "DB_HOST": "tma-cloud-postgres", "DB_PORT": "5432", "DB_MODE": "host", "DB_CONTAINER": ""}
    assert not [volume for volume in worker["volumes"] if "docker.sock" in volume], worker["volumes"]
    assert not worker.get("group_add") and "privileged" not in worker, worker
    assert environment["DB_PASSWORD"] == tma["DB_PASSWORD"] != ours["DB_PASSWORD"]
    assert environment["FILE_ENCRYPTION_KEY"] == tma["FILE_ENCRYPTION_KEY"]
    assert environment["UPLOAD_DIR"] == "/app/uploads" and environment["TMA_ENV_FILE"] == "/run/tma-config/.env"
    assert sorted(worker["networks"]) == ["default", "tma"]
    assert config["networks"]["tma"] == {"external": True, "name": network}
    assert f"{tma_dir}/uploads:/app/uploads:ro" in worker["volumes"]
    copied = [volume for volume in services_["tma-config"]["volumes"] if ":/source/.env" in volume]
    assert copied == [f"{tma_dir}/.env:/source/.env:ro"], "TMA Cloud's .env goes into the sets, not ours"
    # On TMA's network, `redis` is TMA's: the worker reaches ours by an alias only ours has; our redis and
    # postgres never join TMA's network (TMA's app would find them under its own service names).
    broker = f"redis://:{ours['REDIS_PASSWORD']}@tma-backup-broker:6379/0"
    assert environment["CELERY_BROKER_URL"] == environment["CELERY_RESULT_BACKEND"] == broker
    assert services_["redis"]["networks"] == {"default": {"aliases": ["tma-backup-broker"]}}
    for name in ("redis", "beat", "flower", "repository-volume", "tma-config", "postgres"):
        assert "tma" not in (services_[name].get("networks") or {}), name
    # TMA's .env reaches the worker only: beat and Flower keep the stack's own settings.
    for name in ("beat", "flower"):
        assert services_[name]["environment"]["DB_PASSWORD"] == ours["DB_PASSWORD"], name
        assert "FILE_ENCRYPTION_KEY" not in services_[name]["environment"], name
    # Writable uploads for a restore, as in the base file.
    rw = _config(Compose(tmp_path, tmp_path / "settings.env", project, (COMPOSE_FILE, JOIN_FILE),
                         TMA_UPLOADS_MODE="rw", **joined))["services"]["worker"]
    assert f"{tma_dir}/uploads:/app/uploads:rw" in rw["volumes"]

    # Each join setting missing: refused, naming it.
    for variable in joined:
        partial = {key: value for key, value in joined.items() if key != variable}
        refused = Compose(tmp_path, tmp_path / "settings.env", project, (COMPOSE_FILE, JOIN_FILE), **partial)("config", "-q")
        assert refused.returncode != 0 and variable in refused.stderr, (variable, refused.stderr)
    # No service anywhere in the joined stack holds the Docker socket.
    for name, service in services_.items():
        assert not [volume for volume in service.get("volumes", []) if "docker.sock" in volume], name

    # Docker mode, only when asked for (docker-compose.docker-mode.yml on top): the socket and its group,
    # pg_dump inside tma-cloud-postgres (or DB_CONTAINER); without DOCKER_GID refused, naming it.
    files = (COMPOSE_FILE, JOIN_FILE, DOCKER_MODE_FILE)
    docker_worker = _config(Compose(tmp_path, tmp_path / "settings.env", project, files, DOCKER_GID="4242",
                                    **joined))["services"]["worker"]
    assert {key: docker_worker["environment"][key] for key in ("DB_HOST", "DB_MODE", "DB_CONTAINER")} == {
        "DB_HOST": "tma-cloud-postgres", "DB_MODE": "docker", "DB_CONTAINER": "tma-cloud-postgres"}
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in docker_worker["volumes"]
    assert docker_worker["group_add"] == ["4242"]
    named = _config(Compose(tmp_path, tmp_path / "settings.env", project, files, DOCKER_GID="4242",
                            DB_CONTAINER="tma-db", **joined))["services"]["worker"]
    assert named["environment"]["DB_CONTAINER"] == "tma-db"
    refused = Compose(tmp_path, tmp_path / "settings.env", project, files, **joined)("config", "-q")
    assert refused.returncode != 0 and "DOCKER_GID" in refused.stderr, refused.stderr


def _up_env_only(env_file: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run([str(REPO / "docker" / "up.sh"), "--env-only", "--env-file", str(env_file)],
                env=_clean_environ(), cwd=cwd)


def _env_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_up_sh_creates_the_env_file_with_random_passwords_and_never_overwrites_it(tmp_path):
    created = tmp_path / "created.env"
    result = _up_env_only(created, tmp_path)
    assert result.returncode == 0, result.stderr
    values = _env_values(created)
    assert created.stat().st_mode & 0o777 == 0o600
    keys = ("DB_PASSWORD", "FLOWER_PASSWORD", "REDIS_PASSWORD", "BACKUP_REPOSITORY_PASSWORD")
    assert set(values) >= {*keys, "CELERY_BROKER_URL"}
    generated = [values[key] for key in keys]
    assert len(set(generated)) == 4 and all(len(value) == 36 and int(value, 16) >= 0 for value in generated), values
    assert "REDIS_PASSWORD" in result.stderr and "appending" not in result.stderr
    assert "BACKUP_REPOSITORY_PASSWORD in" in result.stderr and "KEEP A COPY OF IT AWAY FROM THIS HOST" in result.stderr
    assert not [value for value in generated if value in result.stderr], "the log names variables, never values"
    assert "BACKUP_REPOSITORY=" not in values, "the stack's default repository unless the operator names one"
    # Run again: not a byte changes, and no note about a new password.
    before = created.read_bytes()
    again = _up_env_only(created, tmp_path)
    assert again.returncode == 0 and created.read_bytes() == before, again.stderr
    assert "KEEP A COPY" not in again.stderr


def test_up_sh_appends_redis_password_to_an_env_file_without_one_and_says_so(tmp_path):
    existing = tmp_path / "existing.env"
    settings = _write_env_file(existing, "tmaappend", omit=("REDIS_PASSWORD",))
    with open(existing, "a") as handle:
        handle.write("# the operator's last line, without its newline")
    before = existing.read_text()
    result = _up_env_only(existing, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{existing} has no REDIS_PASSWORD: appending a random one" in result.stderr
    after = existing.read_text()
    # (+ 2: the line completed, REDIS_PASSWORD; + 3: the TASK_SIGNING_* settings, tests/test_up_signing.py)
    assert after.startswith(before + "\n") and after.count("\n") == before.count("\n") + 2 + 3
    values = _env_values(existing)
    assert len(values["REDIS_PASSWORD"]) == 36 and values["DB_PASSWORD"] == settings["DB_PASSWORD"]
    assert values["REDIS_PASSWORD"] not in result.stderr, "the log names the variable, never its value"
    assert existing.stat().st_mode & 0o777 == 0o600, "the file keeps its mode"

    # A password that cannot go into a URL, or an empty one: refused, naming the variable; file untouched.
    for bad in ("p@ss:word", ""):
        existing.write_text(before.replace("\n#", f"\nREDIS_PASSWORD={bad}\n#", 1))
        kept = existing.read_bytes()
        refused = _up_env_only(existing, tmp_path)
        assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr, refused.stderr
        assert existing.read_bytes() == kept


def test_up_sh_appends_a_repository_password_only_when_there_is_none_and_says_to_keep_it(tmp_path):
    existing = tmp_path / "existing.env"
    settings = _write_env_file(existing, "tmarepo", omit=("BACKUP_REPOSITORY_PASSWORD",))
    before = existing.read_text()
    result = _up_env_only(existing, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{existing} has no BACKUP_REPOSITORY_PASSWORD: appending a random one" in result.stderr
    assert "KEEP A COPY OF IT AWAY FROM THIS HOST" in result.stderr
    after = existing.read_text()
    assert after.startswith(before) and after.count("\n") == before.count("\n") + 1 + 3  # + TASK_SIGNING_*
    values = _env_values(existing)
    assert len(values["BACKUP_REPOSITORY_PASSWORD"]) == 36 and values["REDIS_PASSWORD"] == settings["REDIS_PASSWORD"]
    assert values["BACKUP_REPOSITORY_PASSWORD"] not in result.stderr
    assert existing.stat().st_mode & 0o777 == 0o600

    # A password file instead: nothing appended (both would be refused by every process).
    existing.write_text(after.replace(f"BACKUP_REPOSITORY_PASSWORD={values['BACKUP_REPOSITORY_PASSWORD']}\n",
                                      "BACKUP_REPOSITORY_PASSWORD_FILE=/run/secrets/restic\n"))
    kept = existing.read_bytes()
    result = _up_env_only(existing, tmp_path)
    assert result.returncode == 0 and existing.read_bytes() == kept, result.stderr
    assert "KEEP A COPY" not in result.stderr

    # Empty: refused, naming the variable, file untouched; .env.example's placeholder: a warning.
    existing.write_text(before + "BACKUP_REPOSITORY_PASSWORD=\n")
    kept = existing.read_bytes()
    refused = _up_env_only(existing, tmp_path)
    assert refused.returncode != 0 and "BACKUP_REPOSITORY_PASSWORD" in refused.stderr, refused.stderr
    assert existing.read_bytes() == kept
    existing.write_text(before + "BACKUP_REPOSITORY_PASSWORD=change-me\n")
    warned = _up_env_only(existing, tmp_path)
    assert warned.returncode == 0 and "WARNING: BACKUP_REPOSITORY_PASSWORD" in warned.stderr, warned.stderr


def test_the_stacks_redis_refuses_a_password_that_a_url_cannot_carry(docker_engine, tmp_path):
    project = f"tmardpw{secrets.token_hex(4)}"
    env_file = tmp_path / "settings.env"
    _write_env_file(env_file, project)
    env_file.write_text(env_file.read_text().replace("REDIS_PASSWORD=", "REDIS_PASSWORD=p@ss:word-"))
    compose = Compose(tmp_path, env_file, project)
    try:
        run = compose("run", "--rm", "-T", "redis", timeout=180)
        assert run.returncode == 2, run
        assert "REDIS_PASSWORD: use letters, digits and - . _ ~ only" in run.stderr + run.stdout, run
        assert "p@ss:word" not in run.stderr + run.stdout
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180)
        assert down.returncode == 0, down.stderr


def _wait_for_fixed_names_to_be_free(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        taken = [name for name in FIXED_NAMES if _run(["docker", "inspect", name]).returncode == 0]
        if not taken:
            return
        if time.monotonic() > deadline:
            _unavailable(f"containers {', '.join(taken)} exist (another stack or test) and did not go away in "
                         f"{timeout:.0f}s; the compose stack needs those names")
        time.sleep(2)


def _http(url: str, auth: tuple[str, str] | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@pytest.fixture
def stack(docker_engine, tmp_path) -> Iterator[tuple[Compose, dict[str, str]]]:
    """The stack, from a settings file written before the broker had a password and before the repository
    (no REDIS_PASSWORD, no BACKUP_REPOSITORY_PASSWORD): docker/up.sh appends random ones and creates the
    default repository in its volume; the settings returned include both passwords."""
    project = f"tmatest{secrets.token_hex(4)}"
    settings = _write_env_file(tmp_path / "settings.env", project,
                               omit=("REDIS_PASSWORD", "BACKUP_REPOSITORY_PASSWORD"))
    compose = Compose(tmp_path, tmp_path / "settings.env", project)
    (tmp_path / "uploads").mkdir()  # TMA_UPLOADS_DIR's default, ./uploads
    _wait_for_fixed_names_to_be_free()
    try:
        up = _run([str(REPO / "docker" / "up.sh"), "--project-directory", str(tmp_path), "--env-file",
                   str(compose.env_file), "-p", project], timeout=900,
                  env={**compose.environ, "UP_SETTLE": "3"}, cwd=tmp_path)
        assert up.returncode == 0, f"docker/up.sh failed:\n{up.stderr[-5000:]}"
        assert "has no REDIS_PASSWORD: appending a random one" in up.stderr
        assert "has no BACKUP_REPOSITORY_PASSWORD: appending a random one" in up.stderr
        assert "repository: creating the stack's default repository in the volume at /repository" in up.stderr
        assert f"in the volume {project}_repository ON THIS HOST" in up.stderr
        for key in ("REDIS_PASSWORD", "BACKUP_REPOSITORY_PASSWORD"):
            settings[key] = _env_values(compose.env_file)[key]
            assert settings[key] not in up.stderr
        yield compose, settings
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=180)
        assert down.returncode == 0, down.stderr
        left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"])
        assert left.stdout.strip() == "", "no container of the test stack is left"


def test_the_stack_comes_up_from_local_images_and_runs_one_backup_end_to_end(stack):
    compose, settings = stack
    secrets_ = (settings["DB_PASSWORD"], settings["FLOWER_PASSWORD"], settings["REDIS_PASSWORD"],
                settings["BACKUP_REPOSITORY_PASSWORD"])

    # TMA Cloud's database gets its files table: 1000 rows, three of them uploads in ./uploads (each 32 bytes
    # longer than the size its row records, as TMA's AES-256-GCM writes them), the rest folders.
    blobs = {f"{secrets.token_hex(8)}.bin": os.urandom(1000 + number) for number in range(3)}
    for name, data in blobs.items():
        (compose.folder / "uploads" / name).write_bytes(data)
    rows = ", ".join(f"('u{number}', 'f{number}', 'file', {len(data) - 32}, '{name}')"
                     for number, (name, data) in enumerate(blobs.items()))
    created = compose.exec("postgres", "psql", "-v", "ON_ERROR_STOP=1", "-q", "-U", "postgres", "-d",
                           "tma_cloud_storage", "-c", f"{TMA_FILES}; INSERT INTO files (id, name, type, size, path) "
                           f"VALUES {rows}; INSERT INTO files (id, name, type) SELECT 'd' || g, 'folder-' || g, "
                           "'folder' FROM generate_series(4, 1000) g;")
    assert created.returncode == 0, created.stderr

    backup = compose.exec("worker", "tma-backup", "backup", timeout=300)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert "redis://:**@redis:6379/0" in backup.stderr and "[OK]" in backup.stderr, "went through the broker"
    assert "[WARN] CELERY_BROKER_URL" not in compose("logs", "--no-color", "worker").stdout, "it has a password"

    listing = compose.exec("worker", "ls", "/backups")  # (the uploads are in the repository only)
    files = sorted(listing.stdout.split())
    dumps = [name for name in files if name.endswith(".dump")]
    # The dump, its .meta and the copy of TMA Cloud's .env taken with it for its set (0600, the worker's)
    assert len(dumps) == 1 and files == [dumps[0], dumps[0] + ".env", dumps[0] + ".meta"], files
    assert dumps[0].startswith("tma_cloud_storage_")
    kept_env = compose.exec("worker", "stat", "-c", "%u %a", f"/backups/{dumps[0]}.env").stdout.split()
    assert kept_env == ["1000", "600"], kept_env
    meta = compose.exec("worker", "cat", f"/backups/{dumps[0]}.meta").stdout
    assert "public.files=1000" in meta and "mode=host" in meta
    verify = compose.exec("worker", "tma-backup", "verify", f"/backups/{dumps[0]}")
    assert verify.returncode == 0, verify.stderr
    assert "Backup is intact" in verify.stderr
    assert compose.exec("worker", "zstd", "--version").returncode == 0, "zstd-stream's tool is in the image"

    # The backup is a set in the stack's repository (its own volume, uid 1000's, 0700), holding the dump
    # and its .meta; status reports it and exits 0.
    owner = compose.exec("worker", "stat", "-c", "%u %a %s", "/repository", "/repository/config").stdout.split()
    assert owner[:2] == ["1000", "700"] and int(owner[-1]) > 0, owner  # uid 1000's, 0700, a restic repository
    listed = compose.exec("worker", "tma-backup", "repository", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    sets = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(sets) == 1 and sets[0]["database"] == "tma_cloud_storage", sets
    stem = dumps[0].removesuffix(".dump")
    assert sets[0]["files"] == sorted([dumps[0], dumps[0] + ".meta", stem + ".env"]), sets
    assert sets[0]["bytes_added"] > 0 and sets[0]["uploads"], sets
    # The set holds the uploads (all referenced ones: none missing) and the settings file the worker got
    # from the one-shot copy (uid 1000's, 0400, though the file on the host is root's and 0600).
    assert "uploads_missing=0" in meta and "uploads_referenced=3" in meta, meta
    assert compose.exec("worker", "stat", "-c", "%u %a", "/run/tma-config/.env").stdout.split() == ["1000", "400"]
    readonly = compose.exec("worker", "touch", "/app/uploads/written-by-the-worker")
    assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr, readonly
    assert f"Off site   : set {sets[0]['id']} in /repository" in backup.stderr, backup.stderr
    status = compose.exec("worker", "tma-backup", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"Off site   : set {sets[0]['id']} of {sets[0]['timestamp']}" in status.stderr
    assert "Backups are current, here and off site." in status.stderr

    # The worker runs as uid 1000; beat is one container; Flower asks for credentials and shows the chain.
    assert compose.exec("worker", "id", "-u").stdout.strip() == "1000"
    assert len(compose("ps", "-q", "beat").stdout.split()) == 1
    assert "beat: Starting..." in compose("logs", "--no-color", "beat").stdout
    flower = "http://" + compose("port", "flower", "5555").stdout.strip()
    assert _http(flower + "/api/tasks", None)[0] == 401
    assert _http(flower + "/api/tasks", (settings["FLOWER_USER"], "wrong"))[0] == 401
    # As the README warns: Flower serves /metrics without its basic auth (hence 127.0.0.1 only).
    assert _http(flower + "/metrics", None)[0] == 200
    flower_auth = (settings["FLOWER_USER"], settings["FLOWER_PASSWORD"])
    # (Flower learns of tasks from the workers' events, which it handles in its own time)
    deadline = time.monotonic() + 30
    while True:
        status, body = _http(flower + "/api/tasks", flower_auth)
        assert status == 200
        tasks = json.loads(body)
        states = {name: [task["state"] for task in tasks.values() if task["name"] == name] for name in CHAIN}
        if all(found == ["SUCCESS"] for found in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(found == ["SUCCESS"] for found in states.values()), (
        states, sorted((str(task["name"]), str(task["state"]), task_id[:8]) for task_id, task in tasks.items()),
        compose("logs", "--no-color", "--tail=40", "flower").stdout)

    # The broker refuses a client without the password: inside the stack and on the published port.
    noauth = compose.exec("redis", "env", "-u", "REDISCLI_AUTH", "redis-cli", "ping")
    assert "NOAUTH" in noauth.stdout + noauth.stderr, noauth
    assert compose.exec("redis", "redis-cli", "ping").stdout.strip() == "PONG"
    host, _, port = compose("port", "redis", "6379").stdout.strip().rpartition(":")
    assert host == "127.0.0.1"
    with socket.create_connection((host, int(port)), timeout=5) as plain:
        plain.sendall(b"PING\r\n")
        assert plain.recv(200).startswith(b"-NOAUTH"), "a client that sends no password is refused"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=host, port=int(port), password="wrong", socket_timeout=5).ping()
    assert redis.Redis(host=host, port=int(port), password=settings["REDIS_PASSWORD"], socket_timeout=5).ping()

    # No secret in Flower's pages and API (workers' configuration and stats, broker page, tasks and their
    # arguments), in any process's argv inside the stack, in the backup's .meta, or in the logs.
    status, workers = _http(flower + "/api/workers?refresh=1", flower_auth)
    assert status == 200 and json.loads(workers), workers
    # Signed task messages (docker/up.sh made the key): the worker accepts only signed ones, Flower asks it signed.
    assert [(w["conf"]["task_serializer"], w["conf"]["accept_content"]) for w in json.loads(workers).values()] == [
        ("auth", ["auth"])], workers
    paths = ["/api/workers?refresh=1", "/api/workers", "/workers", "/broker", "/tasks", "/api/task/types",
             "/metrics", "/", "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0&order[0][dir]=asc"
             "&columns[0][data]=name"]
    paths += [f"/worker/{name}" for name in json.loads(workers)]
    paths += [f"/{kind}/{task_id}" for task_id in tasks for kind in ("task", "api/task/info", "api/task/result")]
    pages = {path: _http(flower + path, flower_auth) for path in paths}
    assert {path: status for path, (status, _) in pages.items() if status != 200} == {}
    assert "redis://:**@redis:6379/0" in pages["/broker"][1], "the broker page shows the URL, masked"
    leaking = {path: secret for path, (_, page) in pages.items() for secret in secrets_ if secret in page}
    assert leaking == {}
    # (the one-shot repository-volume has exited, with 0: the worker waited for that)
    one_shot = compose("ps", "-q", "repository-volume").stdout.strip()
    assert _run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", one_shot]).stdout.split() == [
        "exited", "0"]
    for container in compose("ps", "-q", "postgres", "redis", "worker", "beat", "flower").stdout.split():
        top = _run(["docker", "top", container, "-eo", "pid,args"])
        assert top.returncode == 0 and not [secret for secret in secrets_ if secret in top.stdout], top.stdout
    assert "redis-server" in compose("top", "redis").stdout
    assert not [secret for secret in secrets_ if secret in body or secret in meta]
    logs = compose("logs", "--no-color").stdout
    assert not [secret for secret in secrets_ if secret in logs]


# ---------------------------------------------------------------------------------------------------------
# Joined to TMA Cloud's own stack (docker-compose.tma.yml)

TMA_UID = 1001  # TMA Cloud's image runs as nodejs (1001); its init-permissions service chowns ./uploads to it


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return _run(["docker", *args], timeout=timeout)


@pytest.fixture
def tma_cloud(docker_engine, tmp_path) -> Iterator[dict[str, Any]]:
    """TMA Cloud's stack as its docker-compose.yml lays it out, started by hand with `docker run`: the
    network `<project>_tma-cloud-network`; tma-local/postgres:18 (TMA runs postgres:18) as container
    tma-cloud-postgres, answering to `postgres` there; a Redis without a password answering to `redis`
    there (TMA's own: the worker must never mistake it for our broker); TMA's folder with its .env (0600,
    root's) and uploads/ (uid 1001's, mode 0755, files 0644, as TMA's app writes them)."""
    _wait_for_fixed_names_to_be_free()
    tma_project = f"tmacloud{secrets.token_hex(3)}"
    network = tma_project + TMA_NETWORK_SUFFIX
    folder = tmp_path / "tma-cloud"
    (folder / "uploads").mkdir(parents=True)
    env = _tma_env(folder / ".env", f"key-{secrets.token_hex(16)}", f"tmapw-{secrets.token_hex(8)}")
    redis_name = f"{tma_project}-redis"
    try:
        assert _docker("network", "create", network).returncode == 0
        started = _docker("run", "-d", "--name", "tma-cloud-postgres", "--network", network, "--network-alias",
                          "postgres", "--stop-signal", "SIGINT", "-e", f"POSTGRES_PASSWORD={env['DB_PASSWORD']}",
                          "-e", "POSTGRES_DB=tma_cloud_storage", "tma-local/postgres:18")
        assert started.returncode == 0, started.stderr
        started = _docker("run", "-d", "--name", redis_name, "--network", network, "--network-alias", "redis",
                          "tma-local/redis:7")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 60
        while _docker("exec", "tma-cloud-postgres", "pg_isready", "-q", "-h", "127.0.0.1").returncode != 0:
            assert time.monotonic() < deadline, _docker("logs", "tma-cloud-postgres").stderr
            time.sleep(0.5)
        yield {"folder": folder, "env": env, "network": network}
    finally:
        _docker("rm", "-f", "-v", "tma-cloud-postgres", redis_name)
        _docker("network", "rm", network)


def _worker_holds_no_docker_socket(compose: Compose) -> None:
    """The worker container, as the engine runs it (`docker inspect`): no Docker socket mounted, no extra
    group, not privileged; inside it, no socket and only its own group."""
    (container,) = compose("ps", "-q", "worker").stdout.split()
    inspected = json.loads(_docker("inspect", container).stdout)[0]
    mounts = [f"{mount.get('Source')}:{mount.get('Destination')}" for mount in inspected["Mounts"]]
    assert not [mount for mount in mounts if "docker.sock" in mount], mounts
    assert not inspected["HostConfig"].get("GroupAdd") and not inspected["HostConfig"].get("Privileged"), \
        inspected["HostConfig"]
    probe = compose.exec("worker", "sh", "-c", "id -G; test -e /var/run/docker.sock || echo no-socket")
    assert probe.stdout.split() == ["1000", "no-socket"], probe.stdout + probe.stderr


def _tma_psql(sql: str) -> subprocess.CompletedProcess[str]:
    return _docker("exec", "tma-cloud-postgres", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres",
                   "-d", "tma_cloud_storage", "-At", "-c", sql)


def test_joined_to_tma_clouds_stack_it_backs_up_and_restores_the_whole_set(tma_cloud, tmp_path):
    folder, uploads = tma_cloud["folder"], tma_cloud["folder"] / "uploads"
    # TMA's uploads: four referenced files (one of them in the trash: still a reference), one no row
    # references (an upload in flight); a folder row has no file.
    blobs = {f"{secrets.token_hex(8)}{suffix}": os.urandom(2000 + number)
             for number, suffix in enumerate((".pdf", ".png", "", ".txt", ".orphan"))}
    for name, data in blobs.items():
        (uploads / name).write_bytes(data)
        os.chown(uploads / name, TMA_UID, TMA_UID)
        (uploads / name).chmod(0o644)
    os.chown(uploads, TMA_UID, TMA_UID)
    referenced = [name for name in blobs if not name.endswith(".orphan")]
    rows = ", ".join(f"('f{number}', 'n{number}', 'file', {len(blobs[name]) - 32}, '{name}', "
                     f"{'now()' if number == 3 else 'NULL'})" for number, name in enumerate(referenced))
    created = _tma_psql(f"{TMA_FILES}; INSERT INTO files VALUES {rows}, ('d1', 'docs', 'folder', NULL, NULL, NULL);")
    assert created.returncode == 0, created.stderr

    project = f"tmajoin{secrets.token_hex(4)}"
    ours = _write_env_file(tmp_path / "settings.env", project)
    # A settings file from before the worker carried PostgreSQL 18's tools: up.sh --join wrote the Docker
    # socket's group into it then. It is left alone, and no longer gives the worker the socket.
    docker_gid = str(os.stat("/var/run/docker.sock").st_gid)
    with open(tmp_path / "settings.env", "a") as settings_file:
        settings_file.write(f"DOCKER_GID={docker_gid}\n")
    compose = Compose(tmp_path, tmp_path / "settings.env", project, (COMPOSE_FILE, JOIN_FILE))
    started = time.monotonic()
    try:
        up = _run([str(REPO / "docker" / "up.sh"), "--project-directory", str(tmp_path), "--env-file",
                   str(compose.env_file), "-p", project, "--join", str(folder)], timeout=900,
                  env={**compose.environ, "UP_SETTLE": "3"}, cwd=tmp_path)
        assert up.returncode == 0, f"docker/up.sh --join failed:\n{up.stderr[-5000:]}"
        up_seconds = time.monotonic() - started
        assert ("joining TMA Cloud's stack: database tma-cloud-postgres (host mode: the worker's own PostgreSQL 18 "
                "tools over TMA's network, no Docker socket; server PostgreSQL 18), network "
                f"{tma_cloud['network']}") in up.stderr, up.stderr
        assert "has DOCKER_GID: no longer used" in up.stderr and "has no DOCKER_GID" not in up.stderr
        written = _env_values(compose.env_file)
        assert written["TMA_DIR"] == str(folder) and written["TMA_NETWORK"] == tma_cloud["network"]
        assert written["DOCKER_GID"] == docker_gid, "the operator's line is left as it was"
        assert written["COMPOSE_FILE"] == f"{COMPOSE_FILE}:{JOIN_FILE}"
        _worker_holds_no_docker_socket(compose)
        # Our postgres never started; tma-cloud-postgres is still TMA's container, untouched.
        assert compose("ps", "-q", "postgres").stdout.strip() == ""
        labels = _docker("inspect", "-f", "{{index .Config.Labels \"com.docker.compose.project\"}}", "tma-cloud-postgres")
        assert labels.stdout.strip() != project

        backup = compose.exec("worker", "tma-backup", "backup", timeout=300)
        assert backup.returncode == 0, backup.stdout + backup.stderr
        assert "redis://:**@tma-backup-broker:6379/0" in backup.stderr, "through our broker, not TMA's `redis`"
        listed = compose.exec("worker", "tma-backup", "repository", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (found,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert found["database"] == "tma_cloud_storage" and found["uploads"], found
        dump = next(name for name in found["files"] if name.endswith(".dump"))
        assert dump.removesuffix(".dump") + ".env" in found["files"], "TMA Cloud's .env is in the set"
        meta = compose.exec("worker", "cat", f"/backups/{dump}.meta").stdout
        fields = dict(line.split("=", 1) for line in meta.splitlines() if "=" in line and not line.startswith("#"))
        # The worker's own pg_dump 18 over TMA's network, not tma-cloud-postgres's through the socket
        assert fields["mode"] == "host" and "container" not in fields, fields
        assert fields["pg_dump_version"] == "18" and fields["server_version"].startswith("18."), fields
        assert fields["uploads_missing"] == "0" and fields["uploads_referenced"] == "4", fields
        assert fields["uploads_unreferenced"] == "1" and fields["uploads_files"] == "5", fields
        key = tma_cloud["env"]["FILE_ENCRYPTION_KEY"].encode()
        assert fields["file_encryption_key_sha256"] == hashlib.sha256(key).hexdigest()
        # The set's .env is TMA Cloud's, byte for byte (its DB_PASSWORD won over ours, which is unused).
        env_copy = compose.exec("worker", "sh", "-c", 'RESTIC_PASSWORD="$BACKUP_REPOSITORY_PASSWORD" exec restic -r '
                                f"/repository dump {found['id']} /{dump.removesuffix('.dump')}.env", timeout=60)
        assert env_copy.returncode == 0 and env_copy.stdout == (folder / ".env").read_text(), env_copy.stderr
        assert ours["DB_PASSWORD"] not in env_copy.stdout
        status = compose.exec("worker", "tma-backup", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        readonly = compose.exec("worker", "touch", "/app/uploads/x")
        assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr

        # The night the uploads and rows were damaged: a file gone, a file overwritten, a row deleted.
        lost, changed = referenced[0], referenced[1]
        (uploads / lost).unlink()
        (uploads / changed).write_bytes(b"damaged")
        assert _tma_psql(f"DELETE FROM files WHERE path = '{referenced[2]}'").returncode == 0
        # The documented restore: TMA Cloud stopped (here: nothing writes), the worker's uid may write the
        # folder, the worker recreated with the uploads writable, then restore --with-uploads.
        os.chown(uploads, 1000, TMA_UID)
        # plain docker-compose (no -f): COMPOSE_FILE, which up.sh wrote into the settings file, names both files
        plain = Compose(tmp_path, tmp_path / "settings.env", project, files=())
        recreated = plain("up", "-d", "worker", timeout=300, TMA_UPLOADS_MODE="rw")
        assert recreated.returncode == 0, recreated.stderr
        deadline = time.monotonic() + 60  # the README's wait: until the new worker answers the broker
        while compose.exec("worker", "celery", "-A", "worker", "inspect", "ping").returncode != 0:
            assert time.monotonic() < deadline, compose("logs", "--tail=30", "worker").stdout
            time.sleep(1)
        _worker_holds_no_docker_socket(compose)  # the recreated worker, which restores
        restored = compose.exec("worker", "tma-backup", "restore", "--from-repository", "latest", "--with-uploads",
                                "--confirm", "tma_cloud_storage", timeout=300)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert "host tools (/usr/lib/postgresql/18/bin/pg_dump) against tma-cloud-postgres:5432" in restored.stderr, \
            restored.stderr
        for name in referenced + [next(name for name in blobs if name.endswith(".orphan"))]:
            assert (uploads / name).read_bytes() == blobs[name], name
        assert _tma_psql("SELECT count(*) FROM files").stdout.strip() == "5"
        # The files that were live are kept inside the bind-mounted folder (the mount point was never
        # renamed), paired with the database copy the same swap kept.
        (previous,) = [entry for entry in uploads.iterdir() if entry.name.startswith(".tma-previous-")]
        assert (previous / changed).read_bytes() == b"damaged" and not (previous / lost).exists()
        kept = previous.name.removeprefix(".tma-previous-")
        assert _tma_psql(f"SELECT 1 FROM pg_database WHERE datname = '{kept}'").stdout.strip() == "1"
        assert not [entry for entry in uploads.iterdir() if entry.name.startswith((".tma-restore-", ".tma-uploads"))]
        assert f"the files that were live are kept in {previous.name}" in restored.stderr, restored.stderr
        # Read-only again, as the README's last step has it.
        assert plain("up", "-d", "worker", timeout=300).returncode == 0
        readonly = compose.exec("worker", "touch", "/app/uploads/x")
        assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr
        print(f"joined stack: up.sh {up_seconds:.0f} s, whole test {time.monotonic() - started:.0f} s")
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=180)
        assert down.returncode == 0, down.stderr
        left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"])
        assert left.stdout.strip() == "", "no container of the test stack is left"
    assert _docker("inspect", "-f", "{{.State.Status}}", "tma-cloud-postgres").stdout.strip() == "running", \
        "down -v of our stack leaves TMA Cloud's database alone"


@pytest.mark.parametrize("major", [19, 16])
def test_joining_a_server_the_images_tools_cannot_serve_is_refused_at_start(docker_engine, tmp_path, major):
    """A TMA Cloud whose PostgreSQL (here a stand-in whose `postgres --version` says so) is newer than the
    worker image's newest pg_dump (19), or older but of a major the image has no tools for (16: pg_dump 18
    would dump it, into archives that restore only into 18 or newer): up.sh --join refuses before anything
    starts, in one line naming the majors and the two ways out; nothing of the stack runs."""
    _wait_for_fixed_names_to_be_free()
    folder = tmp_path / "tma-cloud"
    (folder / "uploads").mkdir(parents=True)
    _tma_env(folder / ".env", f"key-{secrets.token_hex(16)}", f"tmapw-{secrets.token_hex(8)}")
    network = f"tmacloud{secrets.token_hex(3)}{TMA_NETWORK_SUFFIX}"
    fake = (f'printf \'#!/bin/sh\\necho "postgres (PostgreSQL) {major}.1"\\n\' >/usr/local/bin/postgres && '
            "chmod 755 /usr/local/bin/postgres && exec sleep 600")
    project = f"tmajnew{secrets.token_hex(4)}"
    _write_env_file(tmp_path / "settings.env", project)
    compose = Compose(tmp_path, tmp_path / "settings.env", project, (COMPOSE_FILE, JOIN_FILE))
    try:
        assert _docker("network", "create", network).returncode == 0
        started = _docker("run", "-d", "--name", "tma-cloud-postgres", "--network", network, "--stop-signal", "SIGKILL",
                          "-e", "PATH=/usr/local/bin:/usr/bin:/bin", "--entrypoint", "sh", "tma-local/postgres:18",
                          "-c", fake)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 30
        while f"{major}.1" not in _docker("exec", "tma-cloud-postgres", "postgres", "--version").stdout:
            assert time.monotonic() < deadline, _docker("logs", "tma-cloud-postgres").stderr
            time.sleep(0.5)
        up = _run([str(REPO / "docker" / "up.sh"), "--project-directory", str(tmp_path), "--env-file",
                   str(compose.env_file), "-p", project, "--join", str(folder)], timeout=900,
                  env=compose.environ, cwd=tmp_path)
        assert up.returncode == 1, up.stderr[-3000:]
        [error] = [line for line in up.stderr.splitlines() if "ERROR" in line]
        why = ("the worker image's pg_dump is 18's, which cannot dump a newer server" if major > 18 else
               "the worker image has no client tools of that major (it has 15 17 18): pg_dump 18 would dump it, but "
               "its archives restore only into PostgreSQL 18 or newer, never into this server")
        assert f"tma-cloud-postgres runs PostgreSQL {major} and {why}" in error, error
        assert f"add {major} to PG_CLIENT_MAJORS in docker/images/common.sh" in error and "--docker-mode" in error, error
        assert compose("ps", "-q").stdout.strip() == "", "nothing of the stack was started"
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180)
        _docker("rm", "-f", "tma-cloud-postgres")
        _docker("network", "rm", network)
