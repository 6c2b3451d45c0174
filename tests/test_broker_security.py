"""Who may send tasks: a worker whose broker has no password and is not on loopback warns at start.

`broker_exposure_warning` over a table of URLs, then real `celery -A worker worker` processes: one on
the private loopback Redis (no warning), and two whose broker host is `tma-backup-nonloopback.invalid`
(a name that never resolves), started in a network namespace of their own (`unshare --net`: only a
loopback interface, down), so that not even a DNS query leaves the machine. Those two never reach a
broker; the warning is printed before the worker connects, and the test stops them once they have tried.
Last, the README's `rediss://` URL for real: a private redis-server on 127.0.0.1 with TLS only and a
password, a throw-away CA, a worker and a backup through it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests import services
from tests.conftest import _unavailable, base_env, run_cli
from worker.coordination.broker import broker_exposure_warning, display_url, is_loopback_host

NON_LOOPBACK = "tma-backup-nonloopback.invalid"
ADVICE = ("has no password and is not on loopback: anyone who reaches it can run backups, restores and "
          "rollbacks of every database this worker serves; set a password (redis://:PASSWORD@host) and TLS "
          "(rediss://)")
WARN_PREFIX = "[WARN] CELERY_BROKER_URL"

# (url, warns, what it shows for the URL when it warns)
CASES = [
    # on the network without a password: warns
    ("redis://redis:6379/0", True, "redis://redis:6379/0"),
    (f"redis://{NON_LOOPBACK}:6379/0", True, f"redis://{NON_LOOPBACK}:6379/0"),
    ("redis://10.0.0.5", True, "redis://10.0.0.5/"),
    ("redis://tmauser@broker.example:6379/0", True, "redis://tmauser@broker.example:6379/0"),
    ("redis://tmauser:@broker.example/0", True, "redis://tmauser@broker.example/0"),  # empty password
    ("redis://:@broker.example/0", True, None),
    ("rediss://broker.example:6380/0?ssl_cert_reqs=required", True, "rediss://broker.example:6380/0"),
    ("REDIS://Broker.Example/0", True, None),
    ("redis://[2001:db8::1]:6379/0", True, None),
    ("redis://[::ffff:10.1.2.3]/0", True, None),
    ("redis://0.0.0.0:6379/0", True, None),
    ("redis://localhost.example.com/0", True, None),  # a name, not the loopback literal
    ("redis://127.0.0.1.example.com/0", True, None),
    ("redis://broker.example:notaport/0", True, "redis://broker.example:notaport/…"),
    ("redis://127.0.0.1:6379/0;redis://broker.example:6379/0", True,
     "redis://127.0.0.1:6379/0;redis://broker.example:6379/0"),  # a failover list: one exposed member
    # a password: fine wherever it is
    ("redis://:s3cret@redis:6379/0", False, None),
    ("redis://tmauser:s3cret@broker.example:6379/0", False, None),
    ("rediss://:s3cret@broker.example:6380/0?ssl_cert_reqs=required", False, None),
    ("redis://:p%40ss@broker.example/0", False, None),
    ("redis://:pw@a.example:1;redis://:pw@b.example:2", False, None),
    # loopback: 127.0.0.0/8, ::1, localhost
    ("redis://127.0.0.1:6379/0", False, None),
    ("redis://127.1.2.3:6379/0", False, None),
    ("redis://[::1]:6379/0", False, None),
    ("redis://[::ffff:127.0.0.1]:6379/0", False, None),
    ("redis://localhost:6379/0", False, None),
    ("redis://LocalHost/0", False, None),
    ("redis://tmauser@localhost/0", False, None),
    ("rediss://127.0.0.1:6380/0", False, None),
    # no host: the client's default, localhost
    ("redis://", False, None),
    ("redis:///0", False, None),
    ("redis://:6379/0", False, None),
    # Unix sockets: never on the network
    ("unix:///run/redis/redis.sock", False, None),
    ("redis+socket:///run/redis/redis.sock?virtual_host=0", False, None),
    ("socket:///run/redis/redis.sock", False, None),
    # no URL, and one that does not parse (Celery refuses it itself)
    ("", False, None),
    ("   ", False, None),
    (None, False, None),
    ("redis://[fe80::1/0", False, None),
]


@pytest.mark.parametrize(("url", "warns", "shown"), CASES, ids=[str(case[0]) for case in CASES])
def test_broker_exposure_warning_over_a_table_of_urls(url, warns, shown):
    message = broker_exposure_warning(url)
    assert (message is not None) == warns, message
    if message:
        assert message.startswith("CELERY_BROKER_URL ") and message.endswith(ADVICE)
        assert "\n" not in message
        if shown is not None:
            assert message == f"CELERY_BROKER_URL {shown} {ADVICE}"


def test_the_shown_url_never_holds_a_password():
    # The warning only fires without a password, but the URL it shows is always the sanitized one.
    for url in ("redis://:s3cret-pw@h:6379/0", "rediss://u:s3cret-pw@h:6380/0?password=s3cret-pw",
                "redis://:s3cret-pw@h:notaport/0", "redis://:s3cret-pw@a:1;redis://:s3cret-pw@b:2"):
        assert "s3cret-pw" not in display_url(url), url
    assert display_url("redis://:s3cret-pw@redis:6379/0") == "redis://:**@redis:6379/0"


@pytest.mark.parametrize(("host", "loopback"), [
    (None, True), ("", True), ("127.0.0.1", True), ("127.255.255.254", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("localhost.", True), ("::ffff:127.0.0.2", True),
    ("128.0.0.1", False), ("0.0.0.0", False), ("::", False), ("::2", False), ("redis", False),
    ("localhost.example", False), ("ip6-localhost", False), ("10.255.255.1", False),
])
def test_only_literal_loopback_counts(host, loopback):
    assert is_loopback_host(host) is loopback


def _warning_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(WARN_PREFIX)]


def test_a_worker_on_the_loopback_broker_prints_no_warning(pg, redis_server, tmp_path):
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=redis_server.url, WORKER_HOST="host-sec",
                   TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("sec@host-sec", env, tmp_path / "worker.log")
    try:
        worker.start()
    finally:
        worker.stop()
    assert "ready." in worker.log() and _warning_lines(worker.log()) == []


def _isolated_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`celery -A worker worker` in a network namespace of its own: nothing it sends can leave."""
    unshare = shutil.which("unshare")
    if not unshare:
        _unavailable("unshare not found (util-linux)")
    prefix = [unshare, "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        _unavailable("cannot create a network namespace here (unshare --net)")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO", "-n",
             "sec@host-sec", "-c", "1", "--without-mingle", "--without-gossip"],
            env=env, cwd=env["TEST_CWD"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _run_until_it_tried_to_connect(env: dict[str, str], log_path: Path, timeout: float = 60) -> str:
    """Start the worker, wait until it has tried to reach its broker (and failed: it cannot), stop it."""
    process = _isolated_worker(env, log_path)
    try:
        deadline = time.monotonic() + timeout
        while "Cannot connect to" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, f"the worker exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no connection attempt: {log_path.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return log_path.read_text(errors="replace")


def test_a_worker_on_a_broker_without_password_off_loopback_warns_once(pg, tmp_path):
    url = f"redis://tmauser@{NON_LOOPBACK}:6379/0"  # a user name, but no password
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=url, WORKER_HOST="host-sec", TEST_CWD=str(tmp_path))
    log = _run_until_it_tried_to_connect(env, tmp_path / "worker.log")
    assert _warning_lines(log) == [f"{WARN_PREFIX} {url} {ADVICE}"], log[-3000:]
    # before the worker connects: ahead of its banner and its first connection attempt
    assert log.index(WARN_PREFIX) < log.index("Cannot connect to"), log[-3000:]


def test_a_worker_with_a_password_off_loopback_does_not_warn_and_never_shows_it(pg, tmp_path):
    password = "brokerpw-5b1e7c"
    url = f"redis://tmauser:{password}@{NON_LOOPBACK}:6379/0"
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=url, WORKER_HOST="host-sec", TEST_CWD=str(tmp_path))
    log = _run_until_it_tried_to_connect(env, tmp_path / "worker.log")
    assert _warning_lines(log) == []
    assert f"redis://tmauser:**@{NON_LOOPBACK}:6379/0" in log, log[-3000:]
    assert password not in log


def _openssl(folder: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _tls_redis(folder: Path, password: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """redis-server on 127.0.0.1 with TLS only (no plain port) and a password (given on stdin, as the
    compose stack does); a throw-away CA signed its certificate for `localhost`."""
    binary = shutil.which("redis-server")
    if not binary or not shutil.which("openssl"):
        _unavailable("redis-server or openssl not found: apt-get install redis-server openssl")
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tma-broker-ca",
             "-keyout", "ca.key", "-out", "ca.crt", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "redis.key",
             "-out", "redis.csr")
    (folder / "redis.ext").write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl(folder, "x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "redis.ext", "-out", "redis.crt")
    port = services.free_port()
    process = subprocess.Popen(
        [binary, "-", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file",
         str(folder / "redis.crt"), "--tls-key-file", str(folder / "redis.key"), "--tls-ca-cert-file",
         str(folder / "ca.crt"), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    assert process.stdin is not None
    process.stdin.write(f"requirepass {password}\n".encode())
    process.stdin.close()
    client = redis.Redis(host="localhost", port=port, password=password, ssl=True,
                         ssl_ca_certs=str(folder / "ca.crt"), socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return process, port, folder / "ca.crt"
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _unavailable("redis-server with TLS did not start (is it built with TLS?)")
            time.sleep(0.1)


def test_the_readmes_rediss_url_carries_a_backup_through_a_tls_broker_with_a_password(pg, tma_db, tmp_path):
    password = "tlsbrokerpw-3c9a41"
    tls_folder = tmp_path / "tls"
    tls_folder.mkdir()
    server, port, ca = _tls_redis(tls_folder, password)
    url = f"rediss://:{password}@localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=url, DB_NAME=tma_db, WORKER_HOST="host-tls",
                   TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("tls@host-tls", env, tmp_path / "worker.log")
    try:
        worker.start()
        # Not the broker's TLS port in plain text: the server does not speak it.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=3).ping()
        result = run_cli(["backup"], env, tmp_path)
    finally:
        worker.stop()
        server.kill()
        server.wait()
    assert result.returncode == 0, result.output
    assert "[OK]" in result.stderr and f"rediss://:**@localhost:{port}/0" in result.stderr, result.stderr
    assert _warning_lines(worker.log()) == []
    assert password not in result.output and password not in worker.log()
    assert [path.name for path in (tmp_path / "backups").iterdir() if path.name.endswith(".dump")]
