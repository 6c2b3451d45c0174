"""Restore through a real worker and Redis: tokens, masking, locking, and a worker killed mid-restore."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from tests import services, tma_cloud
from tests.conftest import TEST_PASSWORD, base_env, run_cli
from tests.helpers import dump_waiting_on_lock, error_lines, only_backup, table_locked, wait_for
from tests.test_restore import change_live, digests, managed_databases
from tests.test_workers import client_app
from worker.celery_app import host_queue
from worker.restore.tokens import RedisTokenStore, TokenBinding, new_token, token_hash


def _backup(env, tmp_path) -> Path:
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    dump, _ = only_backup(Path(env["BACKUP_DIR"]), env["DB_NAME"])
    return dump


def _prepare(env, tmp_path, file: Path) -> str:
    result = run_cli(["restore", str(file), "--prepare"], env, tmp_path)
    assert result.returncode == 0, result.output
    token = result.stdout.strip()
    assert len(token) >= 22 and "\n" not in token  # ≥128 bits, urlsafe
    return token


def test_prepared_token_restores_once_then_is_refused(pg, admin, broker_env, tma_db, tmp_path):
    dump = _backup(broker_env, tmp_path)
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    token = _prepare(broker_env, tmp_path, dump)
    result = run_cli(["restore", "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert result.returncode == 0, result.output
    assert digests(pg, tma_db) == at_backup

    change_live(pg, tma_db)
    live = digests(pg, tma_db)
    again = run_cli(["restore", "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert again.returncode == 1
    assert "unknown, expired or already used" in error_lines(again.stderr)[0]
    assert digests(pg, tma_db) == live
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


def test_wrong_name_expired_token_and_token_for_another_file_are_refused(pg, broker_env, tma_db, tmp_path):
    dump = _backup(broker_env, tmp_path)
    change_live(pg, tma_db)
    live = digests(pg, tma_db)

    token = _prepare(broker_env, tmp_path, dump)
    result = run_cli(["restore", "--token", token, "--confirm", "someone_else"], broker_env, tmp_path)
    assert result.returncode == 1 and "does not match" in error_lines(result.stderr)[0]
    result = run_cli(["restore", "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert result.returncode == 1, "a token is used up by a wrong confirmation"

    # The token's lifetime is the worker's RESTORE_TOKEN_TTL: a worker with a 1 s lifetime issues this one.
    broker = broker_env["CELERY_BROKER_URL"].rsplit("/", 1)[0] + "/8"
    short = {**broker_env, "RESTORE_TOKEN_TTL": "1", "CELERY_BROKER_URL": broker}
    short_worker = services.WorkerProcess("ttl@host-main", short, tmp_path / "ttl-worker.log").start()
    try:
        token = _prepare(short, tmp_path, dump)
        time.sleep(2.5)
        result = run_cli(["restore", "--token", token, "--confirm", tma_db], short, tmp_path)
        assert result.returncode == 1 and "expired" in error_lines(result.stderr)[0]
    finally:
        short_worker.stop()

    other = dump.with_name(dump.name.replace(dump.name[len(tma_db) + 1:-5], "20000101T000000Z"))
    other.write_bytes(dump.read_bytes())
    other.with_name(other.name + ".meta").write_text(
        dump.with_name(dump.name + ".meta").read_text().replace(dump.name[len(tma_db) + 1:-5], "20000101T000000Z"))
    token = _prepare(broker_env, tmp_path, dump)
    result = run_cli(["restore", str(other), "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert result.returncode == 1 and "issued for" in error_lines(result.stderr)[0]

    token = _prepare(broker_env, tmp_path, other)
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 0x01  # the file changes between prepare and restore
    other.write_bytes(bytes(data))
    result = run_cli(["restore", "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert result.returncode == 1 and "SHA-256 mismatch" in error_lines(result.stderr)[0]
    assert digests(pg, tma_db) == live


def test_tokens_and_passwords_stay_out_of_results_events_and_logs(pg, admin, broker_env, celery_worker_proc,
                                                                  redis_server, tma_db, tmp_path):
    dump = _backup(broker_env, tmp_path)
    app = client_app(broker_env["CELERY_BROKER_URL"])
    events: list[dict] = []
    ready = threading.Event()
    receivers = []

    def capture() -> None:
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": events.append})
            receivers.append(receiver)
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=True)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.5)
    token = _prepare(broker_env, tmp_path, dump)
    result = run_cli(["restore", "--token", token, "--confirm", tma_db], broker_env, tmp_path)
    assert result.returncode == 0, result.output
    time.sleep(1.5)
    receivers[0].should_stop = True
    thread.join(timeout=10)

    received = [event for event in events if event.get("type") == "task-received" and event.get("name") == "tma_backup.restore"]
    assert received, "the restore task's events were captured"
    assert "***" in received[0]["kwargs"]
    text = repr(events)
    assert token not in text and TEST_PASSWORD not in text
    client = redis.Redis.from_url(redis_server.url)
    stored = b"".join(client.get(key) or b"" for key in client.keys("celery-task-meta-*"))
    assert token.encode() not in stored and TEST_PASSWORD.encode() not in stored
    assert token not in celery_worker_proc.log() and TEST_PASSWORD not in celery_worker_proc.log()
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


def _big_database(pg, admin, name: str, rows: int = 5_000_000) -> None:
    tma_cloud.create_database(admin, name)
    with pg.connect(name, autocommit=True) as connection:
        tma_cloud.create_schema(connection)
        tma_cloud.populate(connection, users=10)
        connection.execute("CREATE TABLE bulk (id bigint PRIMARY KEY, payload text)")
        connection.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))


def _start(env, tmp_path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([services.TMA_BACKUP, *args], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def test_restores_and_backups_of_one_database_exclude_each_other(pg, admin, redis_server, tmp_path):
    name = "tma_lock_restore"
    tma_cloud.drop_database(admin, name)
    _big_database(pg, admin, name)
    broker = f"redis://127.0.0.1:{redis_server.port}/6"
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-r", DB_NAME=name,
                   TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("r@host-r", env, tmp_path / "worker.log").start(["-c", "3"])
    try:
        dump = _backup(env, tmp_path)
        live = digests(pg, name)
        first = _start({**env, "RESTORE_JOBS": "1"}, tmp_path, "restore", str(dump), "--confirm", name)
        wait_for(lambda: managed_databases(admin, "scratch"), timeout=60, what="the first restore's scratch database")
        second = _start(env, tmp_path, "restore", str(dump), "--confirm", name)
        backup = _start(env, tmp_path, "backup")
        _, second_err = second.communicate(timeout=120)
        _, backup_err = backup.communicate(timeout=120)
        still_running = first.poll() is None
        _, stderr = first.communicate(timeout=300)
        assert still_running, "the first restore must still have been running during the checks"
        assert first.returncode == 0, stderr
        assert second.returncode == 1 and "is busy" in error_lines(second_err)[0], second_err
        assert backup.returncode == 1 and "is busy" in error_lines(backup_err)[0], backup_err
        assert digests(pg, name) == live

        with table_locked(pg, name, "bulk"):
            running_backup = _start(env, tmp_path, "backup")
            wait_for(lambda: dump_waiting_on_lock(admin, name), what="a backup to be running")
            during_backup = run_cli(["restore", str(dump), "--confirm", name], env, tmp_path)
        _, stderr = running_backup.communicate(timeout=300)
        assert running_backup.returncode == 0, stderr
        assert during_backup.returncode == 1 and "is busy" in error_lines(during_backup.stderr)[0]
    finally:
        worker.stop()
        tma_cloud.drop_database(admin, name)
        for kept in managed_databases(admin, "previous"):
            tma_cloud.drop_database(admin, kept)


def test_a_worker_killed_mid_restore_leaves_live_unchanged_is_not_rerun_and_the_next_drill_cleans_up(
        pg, admin, redis_server, tmp_path):
    name = "tma_kill_restore"
    tma_cloud.drop_database(admin, name)
    _big_database(pg, admin, name, rows=2_000_000)
    broker = f"redis://127.0.0.1:{redis_server.port}/7"
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-x", DB_NAME=name,
                   BACKUP_LOCK_TIMEOUT="6", TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("x@host-x", env, tmp_path / "worker.log").start()
    try:
        dump = _backup(env, tmp_path)
        change_live(pg, name)
        live = digests(pg, name)
        restore = _start(env, tmp_path, "restore", str(dump), "--confirm", name)
        wait_for(lambda: managed_databases(admin, "scratch"), timeout=60, what="the scratch database")
        worker.kill()
        restore.kill()
        restore.wait()
        assert digests(pg, name) == live
        assert managed_databases(admin, "scratch"), "the killed restore left its scratch database"
        time.sleep(7)  # the lock expires
        worker = services.WorkerProcess("x2@host-x", env, tmp_path / "worker2.log").start()
        result = run_cli(["drill"], env, tmp_path)
        assert result.returncode == 0, result.output
        assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "drill") == []
        time.sleep(1)
        assert "tma_backup.restore[" not in worker.log(), "the killed restore is never redelivered"
        assert digests(pg, name) == live
    finally:
        worker.stop()
        tma_cloud.drop_database(admin, name)
        for kept in managed_databases(admin, "previous"):
            tma_cloud.drop_database(admin, kept)


def test_restore_and_rollback_sent_straight_to_the_broker_without_a_valid_token_change_nothing(
        pg, admin, broker_env, tma_db, tmp_path):
    """Whoever can write to the broker sends `tma_backup.rollback` and `tma_backup.restore` with plain
    Celery, no CLI: without a token that `restore_prepare`/`rollback_prepare` issued, nothing is swapped."""
    assert run_cli(["backup"], broker_env, tmp_path).returncode == 0
    dump, _ = only_backup(Path(broker_env["BACKUP_DIR"]), tma_db)
    restored = run_cli(["restore", str(dump), "--confirm", tma_db], broker_env, tmp_path)
    assert restored.returncode == 0, restored.output  # now there is a kept copy a rollback could bring back
    kept_before = managed_databases(admin, "previous")
    assert kept_before
    live = digests(pg, tma_db)
    app = client_app(broker_env["CELERY_BROKER_URL"])
    forged = [
        ("tma_backup.rollback", {"token": "forged-token", "confirm": tma_db}),
        ("tma_backup.rollback", {"token": "", "confirm": tma_db}),
        ("tma_backup.restore", {"token": "forged-token", "confirm": tma_db}),
        ("tma_backup.restore", {"token": "forged-token", "confirm": tma_db, "file": str(dump)}),
    ]
    for name, kwargs in forged:
        result = app.send_task(name, kwargs=kwargs, queue=host_queue("host-main"))
        with pytest.raises(Exception, match="refused: the token is unknown"):
            result.get(timeout=60)
    assert digests(pg, tma_db) == live, "the live database is unchanged"
    assert managed_databases(admin, "previous") == kept_before, "no copy was swapped in or out"
    # A rollback token cannot be spent on a restore, nor a restore token on a rollback.
    store = RedisTokenStore(redis.Redis.from_url(broker_env["CELERY_BROKER_URL"]))
    token = new_token()
    store.put(token_hash(token), TokenBinding(tma_db, kept_before[-1], "", "host-main", "rollback"), 60)
    result = app.send_task("tma_backup.restore", kwargs={"token": token, "confirm": tma_db},
                           queue=host_queue("host-main"))
    with pytest.raises(Exception, match="issued for a rollback, not a restore"):
        result.get(timeout=60)
    assert digests(pg, tma_db) == live
    rolled = run_cli(["rollback", "--database", tma_db, "--confirm", tma_db], broker_env, tmp_path)
    assert rolled.returncode == 0, rolled.output
    assert "Roll back  :" in rolled.stderr
