"""`tma-backup repair`, the `tma_backup.repair` task and the repair every worker runs when it starts: a
crash in the middle of a swap no longer leaves the live database refusing connections until the next
restore or drill. Real PostgreSQL, real crashes (`TMA_BACKUP_CRASH_AT`), real workers."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests import services, tma_cloud
from tests.conftest import base_env, run_cli
from tests.helpers import (
    accepts_connections,
    error_lines,
    lock_of,
    only_backup,
    settings_for,
    wait_for,
    wait_until_free,
)
from tests.test_drill_database import exists, leftover_scratch
from tests.test_restore import change_live, digests, managed_databases
from worker.coordination.locks import held, renewal_interval
from worker.restore import swap
from worker.settings import Settings

CRASH = "swap:connections-refused"


def allows_connections(admin: Any, database: str) -> bool:
    return bool(admin.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)).fetchone()[0])


def scratches_of(admin: Any, live: str) -> list[str]:
    return [name for role in (swap.SCRATCH, swap.DRILL) for name in (d.name for d in swap.managed(admin, live, role))]


def left_by_a_swap_crash(admin: Any, database: str) -> str:
    """What a restore killed at `swap:connections-refused` leaves, made by hand: the live database
    marked and refusing connections, its scratch database beside it. Returns the scratch's name."""
    scratch = leftover_scratch(admin, database)
    swap.mark_swapping(admin, database, "crashed-run")
    swap.set_allow_connections(admin, database, False)
    return scratch


def drop_kept(admin: Any) -> None:
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


def test_a_swap_crash_is_reported_by_status_and_repair_re_enables_it_leaving_kept_copies_alone(
        pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, _ = only_backup(backup_dir, tma_db)
    change_live(pg, tma_db)
    restored = run_cli(["restore", str(dump), "--confirm", tma_db], cli_env, tmp_path)
    assert restored.returncode == 0, restored.output
    [kept] = managed_databases(admin, "previous", tma_db)
    swap.mark_swapping(admin, kept, "crash-after-the-renames")  # as a crash before its mark was cleared leaves it
    change_live(pg, tma_db)
    live = digests(pg, tma_db)
    crashed = run_cli(["restore", str(dump), "--confirm", tma_db], {**cli_env, "TMA_BACKUP_CRASH_AT": CRASH}, tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.output
    assert not accepts_connections(pg, tma_db) and swap.is_marked(admin, tma_db)
    [scratch] = managed_databases(admin, "scratch")
    try:
        # (a) status names the database and the remedy, exit 1
        status = run_cli(["status"], cli_env, tmp_path)
        assert status.returncode == 1, status.output
        [line] = error_lines(status.stderr)
        assert repr(tma_db) in line and "refusing connections" in line and "tma-backup repair" in line, line

        # (b) repair (in-process, every database): re-enabled, mark cleared, scratch dropped, kept copy untouched
        wait_until_free(settings_for(cli_env), tma_db)  # the killed restore's lock lease runs out
        repaired = run_cli(["repair"], cli_env, tmp_path)
        assert repaired.returncode == 0, repaired.output
        assert f"{tma_db}: connections re-enabled" in repaired.stderr and scratch in repaired.stderr, repaired.stderr
        assert accepts_connections(pg, tma_db)
        assert digests(pg, tma_db) == live, "the live database is the old one, whole"
        assert not swap.is_marked(admin, tma_db)
        assert managed_databases(admin, "scratch") == [] and not exists(admin, scratch)
        assert managed_databases(admin, "previous", tma_db) == [kept], "the kept copy is still there"
        assert not allows_connections(admin, kept) and swap.is_marked(admin, kept), "and untouched"

        status = run_cli(["status"], cli_env, tmp_path)
        assert status.returncode == 0 and error_lines(status.stderr) == [], status.output
        assert "Backups are current." in status.stderr
        again = run_cli(["repair", "--database", tma_db], cli_env, tmp_path)
        assert again.returncode == 0 and "Nothing to repair" in again.stderr, again.output
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')
        drop_kept(admin)


def test_a_new_worker_repairs_a_swap_crash_by_itself_at_start(pg, admin, redis_server, tma_db, tmp_path):
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/13",
                   WORKER_HOST="host-repair", DB_NAME=tma_db, BACKUP_LOCK_TIMEOUT="6", TEST_CWD=str(tmp_path))
    crashing = services.WorkerProcess("crash@host-repair", {**env, "TMA_BACKUP_CRASH_AT": CRASH},
                                      tmp_path / "crashing.log").start()
    fresh = None
    try:
        assert run_cli(["backup"], env, tmp_path).returncode == 0
        dump, _ = only_backup(Path(env["BACKUP_DIR"]), tma_db)
        change_live(pg, tma_db)
        live = digests(pg, tma_db)
        crashed = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path, timeout=120)
        assert crashed.returncode == 1, crashed.output  # the pool process running it was killed at the crash point
        assert not accepts_connections(pg, tma_db) and swap.is_marked(admin, tma_db)
        assert managed_databases(admin, "scratch")
        crashing.stop()

        fresh = services.WorkerProcess("fresh@host-repair", env, tmp_path / "fresh.log").start()
        wait_for(lambda: accepts_connections(pg, tma_db), timeout=30, interval=0.2,
                 what="the new worker to re-enable the database by itself")
        assert digests(pg, tma_db) == live
        assert not swap.is_marked(admin, tma_db)
        wait_for(lambda: managed_databases(admin, "scratch") == [], timeout=10, what="the scratch database dropped")
        wait_for(lambda: f"repaired {tma_db!r}" in fresh.log(), timeout=10, what="the repair in the worker's log")
        assert "Received task" not in fresh.log(), "repaired in the worker itself: no task message"
    finally:
        crashing.stop()
        if fresh is not None:
            fresh.stop()
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')
        drop_kept(admin)


def test_a_worker_starts_and_warns_once_when_the_database_server_is_unreachable(pg, redis_server, tmp_path):
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/14",
                   WORKER_HOST="host-nodb", DB_PORT=str(services.free_port()), TEST_CWD=str(tmp_path))
    worker = services.WorkerProcess("nodb@host-nodb", env, tmp_path / "worker.log").start()  # ready: not blocked
    try:
        line = "repair at worker start-up did not run"
        wait_for(lambda: line in worker.log(), timeout=30, what="the start-up repair's warning")
        assert worker.log().count(line) == 1 and "WARNING" in worker.log()
        assert worker.process is not None and worker.process.poll() is None, "the worker is still running"
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()


def test_an_operators_own_refusal_of_connections_is_left_alone_by_repair(pg, admin, cli_env, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    scratch = leftover_scratch(admin, tma_db)
    admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS false')
    try:
        repaired = run_cli(["repair"], cli_env, tmp_path)
        assert repaired.returncode == 0, repaired.output
        assert not exists(admin, scratch), "the leftover scratch database is dropped"
        assert not accepts_connections(pg, tma_db), "the operator's own refusal stays"
        again = run_cli(["repair", "--database", tma_db], cli_env, tmp_path)
        assert again.returncode == 0 and "Nothing to repair" in again.stderr, again.output
        assert not allows_connections(admin, tma_db)
        status = run_cli(["status"], cli_env, tmp_path)
        assert status.returncode == 0 and error_lines(status.stderr) == [], status.output
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')


def test_repair_skips_a_database_whose_lock_is_held_and_says_so(pg, admin, cli_env, tma_db, tmp_path):
    scratch = left_by_a_swap_crash(admin, tma_db)
    settings = settings_for(cli_env)
    lock = lock_of(settings, tma_db, "restore-in-progress")
    lock.acquire()
    try:
        for args in (["repair", "--database", tma_db], ["repair"]):
            skipped = run_cli(args, cli_env, tmp_path)
            assert skipped.returncode == 1, skipped.output
            [line] = error_lines(skipped.stderr)
            assert "not repaired" in line and tma_db in line, line
            assert f"{tma_db}: skipped" in skipped.stderr and "is busy" in skipped.stderr, skipped.stderr
            assert not allows_connections(admin, tma_db) and swap.is_marked(admin, tma_db), "untouched"
            assert exists(admin, scratch)
    finally:
        lock.release()
    try:
        repaired = run_cli(["repair", "--database", tma_db], cli_env, tmp_path)
        assert repaired.returncode == 0, repaired.output
        assert accepts_connections(pg, tma_db) and not swap.is_marked(admin, tma_db) and not exists(admin, scratch)
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')


def test_repair_through_a_worker(pg, admin, broker_env, tma_db, tmp_path):
    scratch = left_by_a_swap_crash(admin, tma_db)
    fields = {key: value for key, value in broker_env.items() if key in Settings.model_fields}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    lock = lock_of(settings, tma_db, "restore-in-progress")
    with held(lock, renewal_interval(settings)):  # renewed as a restore's: the repair may take over one lease
        skipped = run_cli(["repair", "--database", tma_db], broker_env, tmp_path)
        assert skipped.returncode == 1 and "is busy" in skipped.stderr, skipped.output
        assert not allows_connections(admin, tma_db) and exists(admin, scratch)
    try:
        repaired = run_cli(["repair", "--database", tma_db], broker_env, tmp_path)
        assert repaired.returncode == 0, repaired.output
        assert f"{tma_db}: connections re-enabled" in repaired.stderr
        assert accepts_connections(pg, tma_db) and not swap.is_marked(admin, tma_db) and not exists(admin, scratch)
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')


def test_beat_runs_the_repair_every_few_minutes_and_each_copy_expires_before_the_next():
    from beat_schedule import REPAIR, build_schedule

    entry = build_schedule(Settings(_env_file=None))[REPAIR]  # type: ignore[call-arg]
    interval = entry["schedule"].total_seconds()
    assert entry["task"] == "tma_backup.repair" and entry["kwargs"] == {"scheduled": True}
    assert 60 <= interval <= 300
    assert 0 < entry["options"]["expires"] < interval


def test_a_repaired_database_is_restored_normally_afterwards(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    """After a repair, the next restore runs as usual (nothing is left that it would trip over)."""
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, _ = only_backup(backup_dir, tma_db)
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    crashed = run_cli(["restore", str(dump), "--confirm", tma_db], {**cli_env, "TMA_BACKUP_CRASH_AT": CRASH}, tmp_path)
    assert crashed.returncode == -signal.SIGKILL
    try:
        wait_until_free(settings_for(cli_env), tma_db)
        assert run_cli(["repair", "--database", tma_db], cli_env, tmp_path).returncode == 0
        restored = run_cli(["restore", str(dump), "--confirm", tma_db], cli_env, tmp_path)
        assert restored.returncode == 0, restored.output
        assert "refusing connections after an interrupted swap" not in restored.stderr, "repair got there first"
        assert digests(pg, tma_db) == at_backup
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')
        drop_kept(admin)
