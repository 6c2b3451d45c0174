"""Real Celery workers and Redis: locking, data locality across hosts, secrets kept out of sight."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from celery import Celery
from celery.result import AsyncResult

from tests import services
from tests.conftest import TEST_PASSWORD, base_env, run_cli
from tests.helpers import (
    PsSampler,
    backups_in,
    dump_waiting_on_lock,
    error_lines,
    leftovers,
    only_backup,
    table_locked,
    wait_for,
)

STEPS = ("dump", "verify", "checksum", "meta", "prune")


def client_app(broker_url: str) -> Celery:
    app = Celery("tests", broker=broker_url, backend=broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_default_queue="tma_backup")
    return app


def _start_cli_backup(env: dict[str, str], cwd: Path, database: str | None = None) -> subprocess.Popen[str]:
    args = [services.TMA_BACKUP, "backup", *(["--database", database] if database else [])]
    return subprocess.Popen(args, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def test_a_second_backup_of_the_same_database_is_refused_while_another_database_proceeds(
        pg, admin, broker_env, tma_db, tmp_path):
    other = f"{tma_db}_other"
    admin.execute(f'CREATE DATABASE "{other}" TEMPLATE "{tma_db}"')
    try:
        with table_locked(pg, tma_db):
            first = _start_cli_backup(broker_env, tmp_path)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="the first dump to be running")
            second = run_cli(["backup"], broker_env, tmp_path)
            assert second.returncode == 1
            [line] = error_lines(second.stderr)
            assert "is busy" in line and tma_db in line
            parallel = run_cli(["backup", "--database", other], broker_env, tmp_path)
            assert parallel.returncode == 0, parallel.output
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
        backup_dir = Path(broker_env["BACKUP_DIR"])
        only_backup(backup_dir, tma_db)
        only_backup(backup_dir, other)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def test_password_never_appears_in_ps_results_logs_or_meta(pg, broker_env, celery_worker_proc, redis_server,
                                                           tma_db, tmp_path):
    assert broker_env["DB_PASSWORD"] == TEST_PASSWORD
    with PsSampler() as sampler:
        result = run_cli(["backup"], broker_env, tmp_path)
    assert result.returncode == 0, result.output
    assert any("pg_dump" in line for line in sampler.lines), "the sampler must have seen pg_dump running"
    assert not [line for line in sampler.lines if TEST_PASSWORD in line]

    client = redis.Redis.from_url(redis_server.url)
    stored = b"".join(
        (client.get(key) or b"") if client.type(key) == b"string" else b"".join(client.lrange(key, 0, -1))
        for key in client.keys("*") if client.type(key) in (b"string", b"list"))
    assert b"celery-task-meta" in b"".join(client.keys("*"))
    assert TEST_PASSWORD.encode() not in stored
    assert TEST_PASSWORD not in celery_worker_proc.log()
    assert TEST_PASSWORD not in result.output
    dump, _ = only_backup(Path(broker_env["BACKUP_DIR"]), tma_db)
    assert TEST_PASSWORD not in dump.with_name(dump.name + ".meta").read_text()


def test_two_workers_on_two_hosts_run_each_chain_where_its_files_are(pg, admin, redis_server, tma_db, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/3"
    workers = {}
    for host in ("host-a", "host-b"):
        directory = tmp_path / host
        env = base_env(pg, directory / "backups", CELERY_BROKER_URL=broker, WORKER_HOST=host,
                       DB_NAME=tma_db, TEST_CWD=str(tmp_path))
        directory.mkdir()
        workers[host] = services.WorkerProcess(f"w@{host}", env, directory / "worker.log").start(["-c", "1"])
    databases = [f"{tma_db}_{index}" for index in range(10)]
    for name in databases:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{tma_db}"')
    app = client_app(broker)
    try:
        kickoffs = [app.send_task("tma_backup.backup", kwargs={"database": name}) for name in databases]
        started = [kickoff.get(timeout=60) for kickoff in kickoffs]
        for run in started:
            AsyncResult(run["steps"][-1], app=app).get(timeout=120)
        hosts_used = {run["host"] for run in started}
        assert hosts_used == {"host-a", "host-b"}, "both workers must have taken chains"
        for run in started:
            mine, theirs = workers[run["host"]], workers[({"host-a", "host-b"} - {run["host"]}).pop()]
            for step_id in run["steps"]:
                # The result reaches the backend a moment before the worker writes its "succeeded" line.
                wait_for(lambda step_id=step_id, mine=mine: f"[{step_id}] succeeded" in mine.log(), timeout=30,
                         what=f"step {step_id} logged as succeeded on {run['host']}")
                assert step_id not in theirs.log()
            dump, meta = only_backup(Path(mine.env["BACKUP_DIR"]), run["database"])
            assert meta.extra["worker_host"] == run["host"]
            assert backups_in(Path(theirs.env["BACKUP_DIR"]), run["database"]) == []
    finally:
        for worker in workers.values():
            worker.stop()
        for name in databases:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_killed_worker_frees_the_lock_and_the_next_backup_cleans_up(pg, admin, redis_server, tma_db, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/4"
    backups = tmp_path / "backups"
    env = base_env(pg, backups, CELERY_BROKER_URL=broker, WORKER_HOST="host-k", DB_NAME=tma_db,
                   BACKUP_LOCK_TIMEOUT="6", TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("k@host-k", env, tmp_path / "worker.log").start()
    client = redis.Redis.from_url(broker)
    try:
        with table_locked(pg, tma_db):
            process = _start_cli_backup(env, tmp_path)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="the dump to be running")
            assert client.keys("tma_backup:lock:*"), "the running backup holds the lock"
            wait_for(lambda: list(backups.glob("*.partial")), what="pg_dump to create its output file")
            worker.kill()
            subprocess.run(["pkill", "-KILL", "-f", "--", f"--file={backups}/"], check=False)
        killed_at = time.monotonic()
        wait_for(lambda: not client.keys("tma_backup:lock:*"), timeout=30, what="the lock to expire")
        assert time.monotonic() - killed_at < 15
        process.kill()
        process.wait()
        worker = services.WorkerProcess("k2@host-k", env, tmp_path / "worker2.log").start()
        result = run_cli(["backup"], env, tmp_path)
        assert result.returncode == 0, result.output
        only_backup(backups, tma_db)
        assert leftovers(backups) == [], "the next run's prune removes the killed run's partial files"
    finally:
        worker.stop()


def test_pg_dump_dies_with_the_worker_process_that_started_it(pg, admin, redis_server, tma_db, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/12"
    backups = tmp_path / "backups"
    env = base_env(pg, backups, CELERY_BROKER_URL=broker, WORKER_HOST="host-o", DB_NAME=tma_db,
                   TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("o@host-o", env, tmp_path / "worker.log").start()
    ours = f"--file={backups}/"

    def pg_dump_pid() -> int | None:
        found = subprocess.run(["pgrep", "-f", "--", ours], capture_output=True, text=True).stdout.split()
        return int(found[0]) if found else None

    try:
        with table_locked(pg, tma_db):
            process = _start_cli_backup(env, tmp_path)
            pid = wait_for(pg_dump_pid, what="pg_dump running")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert parent != worker.process.pid, "pg_dump runs under a pool process"
            import os
            import signal

            os.kill(parent, signal.SIGKILL)  # the OOM killer takes the pool process, not the whole worker
            wait_for(lambda: pg_dump_pid() is None, timeout=10, what="the orphaned pg_dump to die")
        process.kill()
        process.wait()
    finally:
        worker.stop()
