"""The backup chain against a real PostgreSQL, in-process and through a real worker and Redis."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.helpers import (
    assert_counts_and_checksum,
    backups_in,
    error_lines,
    leftovers,
    only_backup,
    restore_copy,
    sha256_file,
    toc_entries,
)
from worker.archive.meta import ROW_COUNTS_HEADER, SEED_KEYS


def _assert_backup_is_exact(pg, admin, backup_dir: Path, database: str) -> None:
    dump, meta = assert_counts_and_checksum(pg, backup_dir, database)
    assert meta.toc_entries == toc_entries(dump)
    live = meta.row_counts
    copy = f"{database}_copy"
    restore_copy(pg, admin, dump, copy)
    try:
        with pg.connect(copy) as connection:
            assert tma_cloud.exact_counts(connection) == live
            with pg.connect(database) as original:
                assert tma_cloud.table_digests(connection) == tma_cloud.table_digests(original)
            extensions = {row[0] for row in connection.execute("SELECT extname FROM pg_extension")}
            assert "pg_trgm" in extensions
    finally:
        tma_cloud.drop_database(admin, copy)


def test_in_process_backup_is_exact_and_restorable(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    result = run_cli(["backup"], cli_env, tmp_path)
    assert result.returncode == 0, result.output
    assert "[INFO]  No broker configured" in result.stderr
    assert "── Backup Complete ──" in result.stderr
    _assert_backup_is_exact(pg, admin, backup_dir, tma_db)
    assert leftovers(backup_dir) == []


def test_backup_through_worker_is_exact_and_restorable(pg, admin, broker_env, tma_db, tmp_path):
    result = run_cli(["backup"], broker_env, tmp_path)
    assert result.returncode == 0, result.output
    assert "No broker configured" not in result.stderr
    backup_dir = Path(broker_env["BACKUP_DIR"])
    _assert_backup_is_exact(pg, admin, backup_dir, tma_db)


def test_meta_keeps_the_seed_keys_in_the_seed_order(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, _ = only_backup(backup_dir, tma_db)
    lines = dump.with_name(dump.name + ".meta").read_text().splitlines()
    keys = [line.split("=", 1)[0] for line in lines[: len(SEED_KEYS)]]
    assert keys == list(SEED_KEYS)
    assert lines[1] == f"database={tma_db}"
    assert lines[4] == "format=custom" and lines[5] == "compression=--compress=6"
    assert ROW_COUNTS_HEADER in lines
    header = lines.index(ROW_COUNTS_HEADER)
    assert lines[header - 1] == ""
    assert "public.users=50" in lines[header + 1:]
    ours = dict(line.split("=", 1) for line in lines[len(SEED_KEYS): header - 1])
    assert {"file_size_bytes", "pg_dump_version", "server_version", "worker_host", "task_id"} <= set(ours)


@pytest.mark.slow
def test_counts_are_exact_while_a_writer_inserts_throughout_the_dump(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    with pg.connect(tma_db, autocommit=True) as connection:
        connection.execute("INSERT INTO audit_log (user_id, action) SELECT 1, 'bulk' FROM generate_series(1, 300000)")
    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        with pg.connect(tma_db, autocommit=True) as connection:
            while not stop.is_set():
                connection.execute("INSERT INTO audit_log (user_id, action) VALUES (1, 'during')")
                connection.execute("INSERT INTO pgboss.job (name) VALUES ('during')")
                inserted[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        before = inserted[0]
        result = run_cli(["backup"], cli_env, tmp_path)
        during = inserted[0] - before
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.output
    assert during > 10, "the writer must have been inserting while the backup ran"
    dump, meta = only_backup(backup_dir, tma_db)
    copy = f"{tma_db}_copy"
    restore_copy(pg, admin, dump, copy)
    try:
        with pg.connect(copy) as connection:
            assert tma_cloud.exact_counts(connection) == meta.row_counts
        with pg.connect(tma_db) as connection:
            final = tma_cloud.exact_counts(connection)
        assert final["public.audit_log"] > meta.row_counts["public.audit_log"], "rows kept coming after the snapshot"
    finally:
        tma_cloud.drop_database(admin, copy)


def test_backup_of_a_missing_database_fails_cleanly_and_keeps_earlier_backups(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    good, _ = only_backup(backup_dir, tma_db)
    before = sha256_file(good)
    result = run_cli(["backup", "--database", "no_such_database"], cli_env, tmp_path)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert "no_such_database" in error_lines(result.stderr)[0]
    assert "Traceback" not in result.output
    assert backups_in(backup_dir, "no_such_database") == []
    assert leftovers(backup_dir) == []
    assert sha256_file(good) == before


def _start_backup(env, cwd) -> subprocess.Popen[str]:

    return subprocess.Popen([services.TMA_BACKUP, "backup"], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def test_pg_dump_killed_mid_dump_leaves_nothing(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    from tests.helpers import dump_waiting_on_lock, table_locked, wait_for

    with table_locked(pg, tma_db):
        process = _start_backup(cli_env, tmp_path)
        wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
        ours = f"--file={backup_dir}/"  # only this test's pg_dump, never another one on the machine
        wait_for(lambda: subprocess.run(["pgrep", "-f", "--", ours], capture_output=True).returncode == 0,
                 what="pg_dump running")
        subprocess.run(["pkill", "-KILL", "-f", "--", ours], check=True)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert len(error_lines(stderr)) == 1 and "pg_dump failed" in stderr and "signal 9" in stderr, stderr
    assert backups_in(backup_dir, tma_db) == []
    assert leftovers(backup_dir) == []


def test_server_stopped_mid_dump_fails_cleanly(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    from tests.helpers import dump_waiting_on_lock, table_locked, wait_for

    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    good, _ = only_backup(backup_dir, tma_db)
    before = sha256_file(good)
    try:
        with table_locked(pg, tma_db):
            process = _start_backup(cli_env, tmp_path)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
            pg.stop("fast")
        _, stderr = process.communicate(timeout=60)
    finally:
        pg.start()
    assert process.returncode == 1
    assert len(error_lines(stderr)) == 1, stderr
    assert "Traceback" not in stderr
    assert backups_in(backup_dir, tma_db) == [good]
    assert sha256_file(good) == before
    assert leftovers(backup_dir) == []


@pytest.mark.slow
def test_an_empty_database_is_backed_up_verified_and_restored(pg, admin, backup_dir, tmp_path):
    from tests.conftest import base_env

    name = "tma_empty_database"
    tma_cloud.drop_database(admin, name)
    tma_cloud.create_database(admin, name)
    try:
        env = base_env(pg, backup_dir, DB_NAME=name)
        result = run_cli(["backup"], env, tmp_path)
        assert result.returncode == 0, result.output
        assert "[WARN]  The database has no tables" in result.stderr
        dump, meta = only_backup(backup_dir, name)
        assert meta.row_counts == {} and meta.toc_entries == toc_entries(dump)
        assert run_cli(["verify", str(dump)], env, tmp_path).returncode == 0
        assert run_cli(["drill"], env, tmp_path).returncode == 0
        empty = backup_dir / f"{name}_20000101T000000Z.dump"
        empty.write_bytes(b"")
        empty.with_name(empty.name + ".meta").write_text(
            dump.with_name(dump.name + ".meta").read_text().replace(meta.sha256, sha256_file(empty)))
        result = run_cli(["verify", str(empty)], env, tmp_path)
        assert result.returncode == 1 and "not a readable dump" in error_lines(result.stderr)[0]
    finally:
        tma_cloud.drop_database(admin, name)
