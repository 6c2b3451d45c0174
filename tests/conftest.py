"""Fixtures over real services (see tests/services.py for how each one starts).

With CI=true a service that cannot be started fails the tests that need it; locally they skip with the
reason and the command that installs what is missing.
"""

from __future__ import annotations

import atexit
import compileall
import gc
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import cheap_kdf, s3_server, services, tma_cloud

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
TEST_PASSWORD = "S3cret-Pw-For-Tests-9f2c1a"
PASSWORD_ROLE = "tma_backup_pw"


# `pytest -m "not slow"` is the everyday subset (under two minutes): everything but these modules, which
# start containers, compose stacks, several workers or Flower, kill and restart services, or run the
# benchmark, and the few longest tests elsewhere (marked `@pytest.mark.slow` where they stand). CI runs
# everything.
SLOW_MODULES = {
    "test_beat", "test_bench_smoke", "test_broker_security", "test_compose", "test_docker_mode", "test_drill_database",
    "test_faults_backup", "test_faults_restore", "test_flower", "test_locks", "test_repair",
    "test_restore_workers", "test_signing", "test_sslmode", "test_workers",
    # the repository, the whole set and notifications: S3 servers, restic, workers, receivers
    "test_repository", "test_faults_repository", "test_uploads", "test_faults_uploads", "test_uploads_s3",
    "test_notify", "test_status", "test_s3_fixture",
    # the whole set under real sequences, two servers on one repository, relative repository paths, and
    # up.sh's signing keys checked by real workers and the compose stack
    "test_sequences", "test_set_identity", "test_repository_path", "test_up_signing",
}
# ... except the quickest test of the modules that change most, which the fast subset runs too. A name here
# that its module no longer has is a collection error, so that the subset never loses one silently.
FAST_IN_SLOW_MODULES = {
    "test_repository": "test_bad_repository_settings_are_one_line_and_exit_2[no password]",
    "test_uploads": "test_a_configuration_file_that_cannot_be_read_is_one_line[a missing file]",
    "test_notify": "test_secrets_are_scrubbed_and_the_other_events_send_one_message_each",
}

# Under pytest-xdist (the README's `-n 4 --dist loadgroup`) tests go to the worker processes one by one,
# each worker with its own PostgreSQL cluster, Redis, S3 server and folders (the session fixtures), except:
# - every test that uses the Docker engine runs on one worker, one after another: the compose stack's fixed
#   container names (tma-cloud-postgres, tma-backup-beat), which docker mode prefers over any other
#   container, and docker mode's choice among the PostgreSQL containers that run must not see each other;
# - a module with a module-scoped fixture (a server, a worker, a background scenario, a backup made once)
#   runs on one worker, so that the fixture is made once, not once per worker.
DOCKER_FIXTURES = {"docker_client", "docker_engine"}


def _module_name(item: pytest.Item) -> str:
    return item.module.__name__.rpartition(".")[2] if item.module is not None else ""


def _xdist_group(item: pytest.Item) -> str | None:
    if not isinstance(item, pytest.Function):
        return None
    if DOCKER_FIXTURES & set(item.fixturenames):
        return "docker"
    definitions = item._fixtureinfo.name2fixturedefs.values()
    if any(defs and defs[-1].scope in ("module", "class", "package") for defs in definitions):
        return _module_name(item)
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    found: dict[str, int] = {}
    for item in items:
        module = _module_name(item)
        if module in SLOW_MODULES:
            if FAST_IN_SLOW_MODULES.get(module) == item.name:
                found[module] = found.get(module, 0) + 1
            else:
                item.add_marker(pytest.mark.slow)
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    collected = {_module_name(item) for item in items}
    lost = [f"{module}::{name}" for module, name in FAST_IN_SLOW_MODULES.items()
            if module in collected and module not in found and sum(_module_name(i) == module for i in items) > 1]
    if lost:
        raise pytest.UsageError(f"tests/conftest.py FAST_IN_SLOW_MODULES names tests that no longer exist: {lost}")
    if hasattr(config, "workerinput"):
        # In an xdist worker (every worker sorts alike): the slow tests are handed out first and the quick
        # ones fill the end, so that no minute-long test starts last while the other workers sit idle.
        # Each module keeps its own order.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    # The collected modules and items live as long as the process: the collections that run while tests
    # allocate need not scan them again (as the CLI does after its imports, worker/cli/main.py).
    gc.freeze()


def _cheap_restic_keys() -> None:
    """Put tests/cheap_kdf.py's `restic` first on PATH for this process and every one it starts (workers,
    the CLI, the tests' own restic calls): repositories the suite initialises open in milliseconds instead
    of half a second of scrypt each time. TMA_TEST_FULL_KDF=1 runs the suite with restic's own keys."""
    real = shutil.which("restic")
    if real is None or os.environ.get("TMA_TEST_FULL_KDF") == "1":
        return
    shim_dir = Path(tempfile.mkdtemp(prefix="tma-test-restic-"))
    atexit.register(shutil.rmtree, shim_dir, True)
    cheap_kdf.install_shim(shim_dir, real)
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"


def _compile_our_code() -> None:
    """Byte-compile the checkout once: with PYTHONDONTWRITEBYTECODE set (as on CI's machines) every CLI run,
    worker and tool the suite starts would otherwise compile worker/ from source again (~0.1 s each)."""
    for part in ("worker", "tasks", "bench", "tests"):
        compileall.compile_dir(services.REPO / part, quiet=1)
    compileall.compile_file(services.REPO / "beat_schedule.py", quiet=1)


def pytest_configure(config: pytest.Config) -> None:
    _cheap_restic_keys()
    if not hasattr(config, "workerinput"):  # once, in the controller (or a run without xdist)
        _compile_our_code()
    # pytest-xdist's loadgroup names each test's group by renaming Item._nodeid; a pytest whose node ids no
    # longer come from that field (9.2) makes it ignore every group without a word, and the Docker tests race
    # for the compose stack's fixed names. Refuse to start instead (the controller: workers cannot say why).
    if getattr(config.option, "dist", "no") == "loadgroup" and "_nodeid" not in pytest.Item.nodeid.fget.__code__.co_names:
        raise pytest.UsageError(f"--dist loadgroup does not work with pytest {pytest.__version__} and this pytest-xdist: "
                                "install the versions pyproject.toml pins (pip install -e '.[test]')")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"service needed by this test is unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def private_cluster() -> Iterator[services.PostgresServer]:
    """A private PostgreSQL cluster (`initdb` + `postgres`) with the password role the tests log in as,
    stopped (immediate) afterwards: the body of a fixture that yields from it."""
    try:
        server = services.start_postgres()
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    with server.connect(autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{TEST_PASSWORD}'")
    yield server
    server.stop("immediate")


@pytest.fixture(scope="session")
def pg() -> Iterator[services.PostgresServer]:
    yield from private_cluster()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[services.RedisServer]:
    try:
        server = services.start_redis()
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3_server.S3Server]:
    """One SeaweedFS `weed mini` for the session (tests/s3_server.py): S3 on 127.0.0.1 with its own key and
    secret (`s3.env()` for tma-backup, `s3.aws_env()` for restic, `s3.client()` for boto3). Tests that stop
    or kill it must start it again before they end."""
    try:
        server = s3_server.start_s3(tmp_path_factory.mktemp("s3"))
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def restic_bin() -> str:
    """The machine's restic (Debian 12: 0.14)."""
    found = shutil.which("restic")
    if not found:
        _unavailable("restic is not installed: apt-get install restic")
    return str(found)


@pytest.fixture
def admin(pg: services.PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    with pg.connect(autocommit=True) as connection:
        yield connection


@pytest.fixture
def tma_db(pg: services.PostgresServer) -> Iterator[str]:
    """A fresh database shaped like TMA Cloud's, with data; dropped afterwards."""
    name = tma_cloud.create_populated(pg, f"tma_{uuid.uuid4().hex[:10]}")
    yield name
    with pg.connect(autocommit=True) as admin:  # a fresh connection: a test may have restarted the server
        tma_cloud.drop_database(admin, name)


def base_env(pg: services.PostgresServer, backup_dir: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for the CLI and workers: no inherited DB_* or Celery settings."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DB_", "BACKUP_", "CELERY_", "RESTORE_", "PG", "WORKER_"))}
    env.update({
        "DB_HOST": pg.host,
        "DB_PORT": str(pg.port),
        "DB_USER": PASSWORD_ROLE,
        "DB_PASSWORD": TEST_PASSWORD,
        "DB_MODE": "host",
        "BACKUP_DIR": str(backup_dir),
        "PYTHONPATH": str(services.REPO),
    })
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str], env: dict[str, str], cwd: Path, input: str | None = None,
            timeout: float = 300) -> CliResult:
    process = subprocess.run(
        [services.TMA_BACKUP, *args], env=env, cwd=cwd, capture_output=True, text=True,
        input=input, stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout,
    )
    return CliResult(process.returncode, process.stdout, process.stderr)


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def cli_env(pg: services.PostgresServer, backup_dir: Path, tma_db: str) -> dict[str, str]:
    """In-process mode (no broker) against the test database."""
    return base_env(pg, backup_dir, DB_NAME=tma_db)


@pytest.fixture(scope="session")
def worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker")


@pytest.fixture(scope="session")
def celery_worker_proc(pg: services.PostgresServer, redis_server: services.RedisServer,
                       worker_dir: Path) -> Iterator[services.WorkerProcess]:
    """One real worker for the session: `celery -A worker worker -E` on host `host-main`."""
    backups = worker_dir / "backups"
    env = base_env(pg, backups, CELERY_BROKER_URL=redis_server.url, WORKER_HOST="host-main",
                   TEST_CWD=str(worker_dir))
    worker = services.WorkerProcess("main@host-main", env, worker_dir / "worker.log").start()
    yield worker
    worker.stop()


@pytest.fixture
def broker_env(celery_worker_proc: services.WorkerProcess, tma_db: str) -> dict[str, str]:
    """The CLI environment that dispatches to the session worker."""
    return {**celery_worker_proc.env, "DB_NAME": tma_db}
