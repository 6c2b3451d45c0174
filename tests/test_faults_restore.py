"""A restore killed at each of its steps: the live database is the old one or the new one, never
absent or half restored, and the next run repairs what the crash left."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.helpers import accepts_connections, only_backup, settings_for, wait_for, wait_until_free
from tests.test_restore import change_live, digests, managed_databases


@pytest.fixture
def prepared(pg, cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, _ = only_backup(backup_dir, tma_db)
    change_live(pg, tma_db)
    return dump, digests(pg, tma_db)


def _cleanup(admin) -> None:
    for role in ("previous", "scratch"):
        for name in managed_databases(admin, role):
            tma_cloud.drop_database(admin, name)


@pytest.mark.parametrize("point", ["restore:restored", "swap:connections-refused", "swap:between-renames"])
def test_a_restore_killed_at_a_step_leaves_the_old_database_and_the_next_run_repairs(
        pg, admin, prepared, cli_env, tma_db, tmp_path, point):
    dump, live = prepared
    result = run_cli(["restore", str(dump), "--confirm", tma_db], {**cli_env, "TMA_BACKUP_CRASH_AT": point}, tmp_path)
    assert result.returncode == -signal.SIGKILL, result.output
    names = {row[0] for row in admin.execute("SELECT datname FROM pg_database")}
    assert tma_db in names, "there is always a live database"
    if point.startswith("swap:"):
        assert not accepts_connections(pg, tma_db), "the crash left the live database refusing connections"
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')
        assert digests(pg, tma_db) == live, "…but it is the old database, whole"
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS false')
    else:
        assert digests(pg, tma_db) == live
    assert managed_databases(admin, "scratch"), "the crash left its scratch database"

    wait_until_free(settings_for(cli_env), tma_db)  # the killed run's lease (BACKUP_LOCK_TIMEOUT) runs out
    drill = run_cli(["drill"], cli_env, tmp_path)
    assert drill.returncode == 0, drill.output
    assert managed_databases(admin, "scratch") == []
    assert accepts_connections(pg, tma_db)
    assert digests(pg, tma_db) == live
    _cleanup(admin)


def test_an_operators_own_refusal_of_connections_is_left_alone(pg, admin, prepared, cli_env, tma_db, tmp_path):
    admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS false')
    try:
        assert run_cli(["drill"], cli_env, tmp_path).returncode == 0
        assert not accepts_connections(pg, tma_db)
    finally:
        admin.execute(f'ALTER DATABASE "{tma_db}" WITH ALLOW_CONNECTIONS true')


def test_a_restore_killed_during_pg_restore_leaves_live_unchanged(pg, admin, prepared, cli_env, tma_db, tmp_path):
    dump, live = prepared
    with pg.connect(tma_db, autocommit=True) as connection:
        connection.execute("CREATE TABLE bulk AS SELECT g AS id, md5(g::text) AS payload FROM generate_series(1, 1500000) g")
    assert run_cli(["backup"], {**cli_env, "BACKUP_COMPRESSION": "0"}, tmp_path).returncode == 0
    newest = sorted(p for p in dump.parent.glob(f"{tma_db}_*.dump"))[-1]
    live = digests(pg, tma_db)
    change_live_again = "INSERT INTO users (email, name) VALUES ('late@example.com', 'late')"
    with pg.connect(tma_db, autocommit=True) as connection:
        connection.execute(change_live_again)
    live = digests(pg, tma_db)
    process = subprocess.Popen([services.TMA_BACKUP, "restore", str(newest), "--confirm", tma_db],
                               env={**cli_env, "RESTORE_JOBS": "1"}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # this restore's own pg_restore filling the scratch database (not its `--list` of the archive, nor the
    # pg_restore of a test running beside this one)
    restoring = ["pgrep", "-P", str(process.pid), "-f", "pg_restore .*--dbname="]
    wait_for(lambda: subprocess.run(restoring, capture_output=True).returncode == 0,
             timeout=60, what="pg_restore running")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert digests(pg, tma_db) == live
    wait_until_free(settings_for(cli_env), tma_db)
    assert run_cli(["drill", str(newest)], cli_env, tmp_path).returncode == 0
    assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "drill") == []
    assert digests(pg, tma_db) == live
    _cleanup(admin)
