"""DB_SSLMODE and DB_SSLROOTCERT (TMA Cloud's own names) against real servers with TLS on: a private
cluster (`services.start_postgres_with_ssl`) and, for docker mode, a container from tma-local/postgres:15,
both with a throw-away CA and a server certificate for `localhost` only (no IP address in it), made
with `openssl` for this module. Every case runs the real `tma-backup` entry point.

The TLS cluster's pg_hba.conf lets the usual test role in over TLS only (`hostnossl … reject`), so a
backup that succeeds proves that psycopg and pg_dump both used TLS; a second role may connect either way,
and the server's `log_connections` lines show which way each of its connections went."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import services, tma_cloud
from tests.conftest import PASSWORD_ROLE, TEST_PASSWORD, _unavailable, base_env, run_cli
from tests.docker_fixtures import (  # noqa: F401  (fixtures)
    CONTAINER_PASSWORD,
    TEST_LABEL,
    PgContainer,
    _published_port,
    create_tma_database,
    docker_client,
    drop_database,
    ensure_image,
    pg15_container,
    remove,
    wait_ready,
)
from tests.helpers import error_lines, leftovers, only_backup

EITHER_ROLE = "tma_backup_either"  # may connect with or without TLS


@dataclass
class Tls:
    ca: Path  # signed the server certificate
    other_ca: Path  # signed nothing we serve
    cert: Path  # CN and DNS name `localhost`, no IP address
    key: Path


def _openssl(folder: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    _make_ca(folder, "test-ca")
    _make_ca(folder, "other-ca")
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt")
    return Tls(folder / "test-ca.crt", folder / "other-ca.crt", folder / "server.crt", folder / "server.key")


@pytest.fixture(scope="module")
def ssl_pg(tls: Tls) -> Iterator[services.PostgresServer]:
    hba = (
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        f"hostssl all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
        f"hostnossl all {PASSWORD_ROLE} 127.0.0.1/32 reject\n"
        f"host all {EITHER_ROLE} 127.0.0.1/32 scram-sha-256\n"
    )
    try:
        server = services.start_postgres_with_ssl(tls.cert, tls.key, hba, log_connections="on")
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    with server.connect(autocommit=True) as admin:
        for role in (PASSWORD_ROLE, EITHER_ROLE):
            admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{TEST_PASSWORD}'")
    yield server
    server.stop("immediate")


@pytest.fixture
def ssl_db(ssl_pg: services.PostgresServer) -> Iterator[str]:
    name = tma_cloud.create_populated(ssl_pg, f"tma_{uuid.uuid4().hex[:10]}")
    yield name
    with ssl_pg.connect(autocommit=True) as admin:
        tma_cloud.drop_database(admin, name)


def files_in(directory: Path) -> list[str]:
    """Everything in BACKUP_DIR but in-process runs' flock files (`.<db>.lock`)."""
    return sorted(p.name for p in directory.iterdir() if not (p.name.startswith(".") and p.name.endswith(".lock")))


def connections_logged(server: services.PostgresServer, offset: int, user: str) -> list[str]:
    """The server's `connection authorized` lines for `user` written after `offset` (log_connections)."""
    deadline = time.monotonic() + 5
    while True:
        with open(server.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if f"connection authorized: user={user} " in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def assert_one_error_and_nothing_left(result: Any, backup_dir: Path, *expected: str) -> str:
    assert result.returncode == 1, result.output
    [line] = error_lines(result.stderr)
    for text in expected:
        assert text in line, line
    assert "Traceback" not in result.output
    assert files_in(backup_dir) == []
    return str(line)


# ----- host mode, the private TLS cluster -----

def test_require_backs_up_over_tls_and_every_connection_is_tls(ssl_pg, ssl_db, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_SSLMODE="require")
    offset = ssl_pg.log_path.stat().st_size
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    only_backup(backup_dir, ssl_db)
    assert leftovers(backup_dir) == []
    # the role is refused without TLS (next test), so success already says so; the log says it again
    lines = connections_logged(ssl_pg, offset, PASSWORD_ROLE)
    assert len(lines) >= 2, lines  # psycopg's session and pg_dump's at least
    assert all("SSL enabled" in line for line in lines), lines


def test_disable_is_refused_by_a_tls_only_role_in_one_line_naming_db_sslmode(ssl_pg, ssl_db, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_SSLMODE="disable")
    result = run_cli(["backup"], env, tmp_path)
    assert_one_error_and_nothing_left(result, backup_dir, f"cannot connect to database '{ssl_db}'",
                                      "no encryption", "(DB_SSLMODE=disable)")


def test_disable_reaches_pg_dump_too(ssl_pg, ssl_db, backup_dir, tmp_path):
    """libpq's default (`prefer`) would use TLS here: pg_dump's connection without it shows that
    PGSSLMODE reached pg_dump, not only psycopg."""
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_USER=EITHER_ROLE, DB_SSLMODE="disable")
    offset = ssl_pg.log_path.stat().st_size
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    only_backup(backup_dir, ssl_db)
    lines = connections_logged(ssl_pg, offset, EITHER_ROLE)
    assert len(lines) >= 2, lines
    assert not [line for line in lines if "SSL enabled" in line], lines


def test_unset_db_sslmode_is_libpqs_prefer(ssl_pg, ssl_db, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_USER=EITHER_ROLE)
    offset = ssl_pg.log_path.stat().st_size
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    lines = connections_logged(ssl_pg, offset, EITHER_ROLE)
    assert len(lines) >= 2 and all("SSL enabled" in line for line in lines), lines


def test_verify_full_with_the_ca_and_the_certificates_name_succeeds(ssl_pg, ssl_db, tls, backup_dir, tmp_path):
    """HOME has no ~/.postgresql/root.crt: pg_dump verifies with DB_SSLROOTCERT (PGSSLROOTCERT) or fails."""
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_HOST="localhost", DB_SSLMODE="verify-full",
                   DB_SSLROOTCERT=str(tls.ca), HOME=str(tmp_path))
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    only_backup(backup_dir, ssl_db)
    assert leftovers(backup_dir) == []


def test_verify_full_refuses_a_host_name_the_certificate_does_not_carry(ssl_pg, ssl_db, tls, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_HOST="127.0.0.1", DB_SSLMODE="verify-full",
                   DB_SSLROOTCERT=str(tls.ca))
    result = run_cli(["backup"], env, tmp_path)
    assert_one_error_and_nothing_left(result, backup_dir, 'does not match host name "127.0.0.1"',
                                      f"(DB_SSLMODE=verify-full, DB_SSLROOTCERT={tls.ca})")


def test_verify_full_refuses_a_certificate_another_ca_signed(ssl_pg, ssl_db, tls, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_HOST="localhost", DB_SSLMODE="verify-full",
                   DB_SSLROOTCERT=str(tls.other_ca))
    result = run_cli(["backup"], env, tmp_path)
    assert_one_error_and_nothing_left(result, backup_dir, "certificate verify failed", "DB_SSLMODE=verify-full")


def test_verify_ca_accepts_the_ca_whatever_the_host_name(ssl_pg, ssl_db, tls, backup_dir, tmp_path):
    env = base_env(ssl_pg, backup_dir, DB_NAME=ssl_db, DB_HOST="127.0.0.1", DB_SSLMODE="verify-ca",
                   DB_SSLROOTCERT=str(tls.ca), HOME=str(tmp_path))
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    only_backup(backup_dir, ssl_db)


# ----- host mode, the usual test cluster (no TLS) -----

def test_require_against_a_server_without_tls_is_one_error_line(cli_env, tma_db, backup_dir, tmp_path):
    result = run_cli(["backup"], {**cli_env, "DB_SSLMODE": "require"}, tmp_path)
    assert_one_error_and_nothing_left(result, backup_dir, f"cannot connect to database '{tma_db}'",
                                      "server does not support SSL, but SSL was required", "(DB_SSLMODE=require)")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("DB_SSLMODE", "sometimes", "'verify-full'"),
        ("DB_SSLMODE", "REQUIRE", "'require'"),
        ("DB_SSLROOTCERT", "/nonexistent/ca.crt", "No such file or directory"),
        ("DB_SSLROOTCERT", "/", "not a folder"),
    ],
)
def test_a_bad_tls_setting_is_one_line_naming_it_and_exit_2(pg, backup_dir, tmp_path, variable, value, says):
    env = base_env(pg, backup_dir, DB_NAME="tma_not_reached", **{variable: value})
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 2, result.output
    [line] = error_lines(result.stderr)
    assert line.startswith(f"[ERROR] {variable}:") and says in line, line
    assert "Traceback" not in result.output
    assert files_in(backup_dir) == []


# ----- docker mode -----
# The tools run inside the container and reach the server over its Unix socket, where TLS does not
# apply; psycopg's connection from the worker crosses the network and honours DB_SSLMODE.

def _postgres_ids(container: Any) -> tuple[int, int]:
    stream, _ = container.get_archive("/etc/passwd")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        member = archive.extractfile("passwd")
        assert member is not None
        for line in member.read().decode().splitlines():
            fields = line.split(":")
            if fields[0] == "postgres":
                return int(fields[2]), int(fields[3])
    raise AssertionError("no postgres user in the image")


def _tls_folder(tls: Tls, hba: str, uid: int, gid: int) -> bytes:
    """A tar of /tls: the certificate, its key (0600) and a pg_hba.conf, owned by the server's user."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        folder = tarfile.TarInfo("tls")
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o700, uid, gid
        archive.addfile(folder)
        for name, data, mode in (("server.crt", tls.cert.read_bytes(), 0o644),
                                 ("server.key", tls.key.read_bytes(), 0o600),
                                 ("pg_hba.conf", hba.encode(), 0o600)):
            info = tarfile.TarInfo(f"tls/{name}")
            info.size, info.mode, info.uid, info.gid = len(data), mode, uid, gid
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tls_container(docker_client: Any, tls: Tls) -> Iterator[PgContainer]:
    """PostgreSQL 15 in a container with TLS on; over TCP only TLS connections are let in, its own
    socket (where the tools connect) is trusted as in every tma-local/postgres container."""
    hba = "local all all trust\nhostssl all all all scram-sha-256\nhostnossl all all all reject\n"
    image = ensure_image(docker_client, 15)
    name = f"tma-test-pg15-tls-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.create(
        image, ["-c", "fsync=off", "-c", "ssl=on", "-c", "ssl_cert_file=/tls/server.crt",
                "-c", "ssl_key_file=/tls/server.key", "-c", "hba_file=/tls/pg_hba.conf"],
        name=name, labels=TEST_LABEL, environment={"POSTGRES_PASSWORD": CONTAINER_PASSWORD},
        ports={"5432/tcp": ("127.0.0.1", None)})
    try:
        container.put_archive("/", _tls_folder(tls, hba, *_postgres_ids(container)))
        container.start()
        server = PgContainer(name, 15, _published_port(container), container)
        wait_ready(server)
    except BaseException:
        remove(container)
        raise
    yield server
    remove(container)


@pytest.fixture
def tls_container_db(tls_container: PgContainer) -> Iterator[str]:
    name = create_tma_database(tls_container)
    yield name
    drop_database(tls_container, name)


def test_docker_mode_verify_full_connects_psycopg_over_tls(tls_container, tls_container_db, tls, backup_dir,
                                                           tmp_path):
    env = tls_container.env(backup_dir, DB_NAME=tls_container_db, DB_HOST="localhost",
                            DB_SSLMODE="verify-full", DB_SSLROOTCERT=str(tls.ca), HOME=str(tmp_path))
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    assert f"inside container '{tls_container.name}'" in result.stderr
    _, meta = only_backup(backup_dir, tls_container_db)
    assert meta.mode == "docker"
    assert leftovers(backup_dir) == []


def test_docker_mode_disable_is_refused_over_tcp_in_one_line_naming_db_sslmode(tls_container, tls_container_db,
                                                                               backup_dir, tmp_path):
    env = tls_container.env(backup_dir, DB_NAME=tls_container_db, DB_SSLMODE="disable")
    result = run_cli(["backup"], env, tmp_path)
    assert_one_error_and_nothing_left(result, backup_dir, f"container '{tls_container.name}'", "no encryption",
                                      "(DB_SSLMODE=disable)")


def test_docker_mode_require_against_a_container_without_tls_is_one_error_line(pg15_container, backup_dir,
                                                                               tmp_path):
    database = create_tma_database(pg15_container)
    try:
        env = pg15_container.env(backup_dir, DB_NAME=database, DB_SSLMODE="require")
        result = run_cli(["backup"], env, tmp_path)
        assert_one_error_and_nothing_left(result, backup_dir, "server does not support SSL, but SSL was required",
                                          "(DB_SSLMODE=require)")
    finally:
        drop_database(pg15_container, database)
