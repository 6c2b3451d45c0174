"""A drill of a named FILE works on the database the file belongs to (its `.meta`), not on DB_NAME:
it takes that database's lock, cleans up only under it, and records its outcome under it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import tma_cloud
from tests.conftest import run_cli
from tests.helpers import error_lines, lock_of, only_backup, settings_for
from tests.test_restore import digests, managed_databases
from worker.coordination.locks import held, renewal_interval
from worker.restore import swap
from worker.settings import Settings


def leftover_scratch(admin: Any, live: str) -> str:
    """A scratch database of `live` as a crashed restore of it leaves behind."""
    name = swap.scratch_name(swap.SCRATCH)
    shape = swap.shape_of(admin, live)
    assert shape is not None
    swap.create_like(admin, name, shape, swap.SCRATCH, live, f"crashed-{uuid.uuid4()}")
    return name


def exists(admin: Any, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


@pytest.fixture
def other_db(pg, admin):
    name = tma_cloud.create_populated(pg, f"tma_b_{uuid.uuid4().hex[:10]}")
    yield name
    for scratch in managed_databases(admin, "scratch") + managed_databases(admin, "drill"):
        if swap.database_comment(admin, scratch).split(":")[2] == name:  # type: ignore[union-attr]
            tma_cloud.drop_database(admin, scratch)
    tma_cloud.drop_database(admin, name)


def test_a_drill_of_another_databases_file_locks_cleans_and_records_under_that_database(
        pg, admin, cli_env, backup_dir, tma_db, other_db, tmp_path):
    a, b = tma_db, other_db
    for database in (a, b):
        assert run_cli(["backup", "--database", database], cli_env, tmp_path).returncode == 0
    b_dump, _ = only_backup(backup_dir, b)
    b_content = digests(pg, b)

    # B is being restored (its lock held), and that restore's scratch database exists.
    lock = lock_of(settings_for(cli_env), b, "restore-of-b-in-progress")
    lock.acquire()
    try:
        scratch = leftover_scratch(admin, b)
        busy = run_cli(["drill", str(b_dump)], cli_env, tmp_path)  # DB_NAME=A
        assert busy.returncode == 1, busy.output
        [line] = error_lines(busy.stderr)
        assert "is busy" in line and repr(b) in line, line
        assert exists(admin, scratch), "the drill dropped the scratch database of a restore in progress"
    finally:
        lock.release()
    status_a = run_cli(["status", "--database", a], cli_env, tmp_path)
    assert "Last drill : none recorded" in status_a.stderr, status_a.stderr
    assert not (backup_dir / f".{a}.last-drill.json").exists()

    # --database that disagrees with the file's .meta: refused, nothing touched (B's leftover stays).
    refused = run_cli(["drill", str(b_dump), "--database", a], cli_env, tmp_path)
    assert refused.returncode == 1, refused.output
    [line] = error_lines(refused.stderr)
    assert f"is a backup of {b!r}, not of {a!r}" in line, line
    assert exists(admin, scratch)
    assert not (backup_dir / f".{a}.last-drill.json").exists() and not (backup_dir / f".{b}.last-drill.json").exists()

    # B's lock free: the drill of B's file runs under B (it drops B's leftover) and is recorded under B.
    passed = run_cli(["drill", str(b_dump)], cli_env, tmp_path)
    assert passed.returncode == 0, passed.output
    assert not exists(admin, scratch)
    assert "Last drill : passed" in run_cli(["status", "--database", b], cli_env, tmp_path).stderr
    assert "Last drill : none recorded" in run_cli(["status", "--database", a], cli_env, tmp_path).stderr
    assert run_cli(["drill", str(b_dump), "--database", b], cli_env, tmp_path).returncode == 0
    assert digests(pg, b) == b_content
    assert managed_databases(admin, "drill") == []


def test_without_a_file_the_drill_is_of_the_newest_backup_of_database_or_db_name(
        cli_env, backup_dir, tma_db, other_db, tmp_path):
    assert run_cli(["backup", "--database", other_db], cli_env, tmp_path).returncode == 0
    none = run_cli(["drill"], cli_env, tmp_path)  # DB_NAME has no backup: a failed drill of DB_NAME
    assert none.returncode == 1 and f"no complete backup of {tma_db!r}" in error_lines(none.stderr)[0]
    result = run_cli(["drill", "--database", other_db], cli_env, tmp_path)
    assert result.returncode == 0, result.output
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    assert "Last drill : passed" in run_cli(["status", "--database", other_db], cli_env, tmp_path).stderr
    assert "Last drill : FAILED" in run_cli(["status", "--database", tma_db], cli_env, tmp_path).stderr


def test_through_a_worker_the_drill_of_a_file_locks_and_records_under_its_database(admin, broker_env, other_db, tma_db,
                                                                                  tmp_path):
    backups = Path(broker_env["BACKUP_DIR"])
    assert run_cli(["backup", "--database", other_db], broker_env, tmp_path).returncode == 0
    dump, _ = only_backup(backups, other_db)
    refused = run_cli(["drill", str(dump), "--database", tma_db], broker_env, tmp_path)
    assert refused.returncode == 1 and "is a backup of" in error_lines(refused.stderr)[0], refused.output
    # the file's database being restored by a worker (its lock held in Redis, as a restore names it)
    fields = {key: value for key, value in broker_env.items() if key in Settings.model_fields}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    lock = lock_of(settings, other_db, "restore-in-progress")
    # renewed as a restore renews it: the refused drill may take longer than one lease under load
    with held(lock, renewal_interval(settings)):
        scratch = leftover_scratch(admin, other_db)
        busy = run_cli(["drill", str(dump)], broker_env, tmp_path)
        assert busy.returncode == 1 and "is busy" in error_lines(busy.stderr)[0], busy.output
        assert exists(admin, scratch)
    result = run_cli(["drill", str(dump)], broker_env, tmp_path)  # DB_NAME=tma_db
    assert result.returncode == 0, result.output
    assert (backups / f".{other_db}.last-drill.json").exists()
    assert not (backups / f".{tma_db}.last-drill.json").exists()
    status = run_cli(["status", "--database", other_db], broker_env, tmp_path)
    assert "Last drill : passed" in status.stderr, status.stderr
