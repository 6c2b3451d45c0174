"""Restore: the live database is replaced only by a verified copy, and only with a valid confirmation."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import psycopg
import pytest

from tests import services, tma_cloud
from tests.conftest import PASSWORD_ROLE, TEST_PASSWORD, _unavailable, base_env, run_cli
from tests.helpers import error_lines, only_backup, sha256_file


def digests(pg, database: str) -> dict[str, str]:
    with pg.connect(database) as connection:
        return tma_cloud.table_digests(connection)


def managed_databases(admin, role: str, of: str | None = None) -> list[str]:
    """The databases the tool made in this cluster in that role; with `of`, only those of that live database
    (under xdist a worker's cluster also holds the kept copies other modules' restores left, as a real one would)."""
    rows = admin.execute(
        "SELECT d.datname, s.description FROM pg_database d JOIN pg_shdescription s ON s.objoid = d.oid"
        " WHERE s.description LIKE %s", (f"tma-backup:{role}:%",)).fetchall()
    return [name for name, description in rows if of is None or description.split(":")[2] == of]


def change_live(pg, database: str) -> None:
    with pg.connect(database, autocommit=True) as connection:
        connection.execute("INSERT INTO users (email, name) VALUES ('new@example.com', 'Added after backup')")
        connection.execute("DELETE FROM share_links")
        connection.execute("ALTER TABLE files ADD COLUMN checksum text DEFAULT 'x'")


@pytest.fixture
def backed_up(cli_env, backup_dir, tma_db, tmp_path) -> tuple[Path, dict[str, str]]:
    result = run_cli(["backup"], cli_env, tmp_path)
    assert result.returncode == 0, result.output
    dump, _ = only_backup(backup_dir, tma_db)
    return dump, cli_env


def test_round_trip_restores_backup_time_content_and_rollback_brings_the_change_back(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    changed = digests(pg, tma_db)
    assert changed != at_backup

    result = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path)
    assert result.returncode == 0, result.output
    assert digests(pg, tma_db) == at_backup
    with pg.connect(tma_db) as connection:  # every table was analyzed (planner statistics exist)
        unanalyzed = connection.execute(
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NULL AND last_autoanalyze IS NULL").fetchone()[0]
        with_stats = connection.execute("SELECT count(DISTINCT tablename) FROM pg_stats WHERE schemaname = 'public'").fetchone()[0]
    assert unanalyzed == 0 and with_stats >= 3
    assert re.search(r"Duration   : [\d.]+s \(checking [\d.]+s, restoring [\d.]+s, counting [\d.]+s, swapping", result.stderr)
    assert "Restart the application to refresh connection pools." in result.stderr
    assert "tma-backup rollback" in result.stderr
    [kept] = managed_databases(admin, "previous", tma_db)
    assert kept.startswith(f"{tma_db}__pre_restore_")
    allowed = admin.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (kept,)).fetchone()[0]
    assert allowed is False, "the kept copy refuses connections until a rollback"
    admin.execute(f'ALTER DATABASE "{kept}" WITH ALLOW_CONNECTIONS true')
    assert digests(pg, kept) == changed
    admin.execute(f'ALTER DATABASE "{kept}" WITH ALLOW_CONNECTIONS false')
    assert managed_databases(admin, "scratch") == []

    result = run_cli(["rollback", "--database", tma_db, "--confirm", tma_db], env, tmp_path)
    assert result.returncode == 0, result.output
    assert digests(pg, tma_db) == changed
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


def _refused(result, live_before, pg, database, expected: str) -> None:
    assert result.returncode in (1, 2), result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert digests(pg, database) == live_before


@pytest.mark.slow
def test_refusals_touch_nothing(pg, admin, backed_up, backup_dir, tma_db, tmp_path):
    dump, env = backed_up
    change_live(pg, tma_db)
    live = digests(pg, tma_db)

    _refused(run_cli(["restore", str(dump), "--confirm", "another_db"], env, tmp_path), live, pg, tma_db, "is not")
    _refused(run_cli(["restore", str(dump)], env, tmp_path, input="wrong_name\n"), live, pg, tma_db, "cancelled")
    _refused(run_cli(["restore", str(dump)], env, tmp_path, input=""), live, pg, tma_db, "end of input")

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(dump, outside / dump.name)
    shutil.copy(dump.with_name(dump.name + ".meta"), outside / (dump.name + ".meta"))
    _refused(run_cli(["restore", f"../outside/{dump.name}", "--confirm", tma_db], env, tmp_path), live, pg, tma_db, "'..'")
    _refused(run_cli(["restore", str(outside / dump.name), "--confirm", tma_db], env, tmp_path), live, pg, tma_db,
             "only from inside BACKUP_DIR")
    link = backup_dir / f"{tma_db}_20000101T000000Z.dump"
    link.symlink_to(outside / dump.name)
    (backup_dir / (link.name + ".meta")).symlink_to(outside / (dump.name + ".meta"))
    _refused(run_cli(["restore", str(link), "--confirm", tma_db], env, tmp_path), live, pg, tma_db,
             "only from inside BACKUP_DIR")

    no_meta = backup_dir / f"{tma_db}_20000101T000001Z.dump"
    shutil.copy(dump, no_meta)
    _refused(run_cli(["restore", str(no_meta), "--confirm", tma_db], env, tmp_path), live, pg, tma_db, ".meta is missing")

    flipped = backup_dir / f"{tma_db}_20000101T000002Z.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    shutil.copy(dump.with_name(dump.name + ".meta"), flipped.with_name(flipped.name + ".meta"))
    _refused(run_cli(["restore", str(flipped), "--confirm", tma_db], env, tmp_path), live, pg, tma_db, "SHA-256 mismatch")
    at_prompt = run_cli(["restore", str(flipped)], env, tmp_path, input=f"{tma_db}\n")
    _refused(at_prompt, live, pg, tma_db, "SHA-256 mismatch")
    assert "Type the database name" not in at_prompt.output  # checked before the operator is asked

    truncated = backup_dir / f"{tma_db}_20000101T000003Z.dump"
    truncated.write_bytes(dump.read_bytes()[:200])
    meta = dump.with_name(dump.name + ".meta").read_text()
    truncated.with_name(truncated.name + ".meta").write_text(
        meta.replace(sha256_file(dump), sha256_file(truncated)))
    _refused(run_cli(["restore", str(truncated), "--confirm", tma_db], env, tmp_path), live, pg, tma_db, "not a readable dump")

    not_a_dump = backup_dir / f"{tma_db}_20000101T000004Z.dump"
    not_a_dump.write_bytes(b"PGDMP? no, just text\n" * 50)
    not_a_dump.with_name(not_a_dump.name + ".meta").write_text(meta.replace(sha256_file(dump), sha256_file(not_a_dump)))
    _refused(run_cli(["restore", str(not_a_dump), "--confirm", tma_db], env, tmp_path), live, pg, tma_db, "not a readable dump")

    _refused(run_cli(["restore", str(backup_dir / "nothing.dump"), "--confirm", tma_db], env, tmp_path), live, pg, tma_db,
             "no such backup file")
    assert managed_databases(admin, "scratch") == []
    assert managed_databases(admin, "previous", tma_db) == []


def test_a_restore_failing_inside_pg_restore_leaves_live_unchanged_and_no_scratch(pg, admin, backed_up, backup_dir, tma_db, tmp_path):
    dump, env = backed_up
    change_live(pg, tma_db)
    live = digests(pg, tma_db)
    damaged = backup_dir / f"{tma_db}_20000101T000005Z.dump"
    data = bytearray(dump.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 64):  # corrupt table data, keep the TOC readable
        data[offset] ^= 0x5A
    damaged.write_bytes(bytes(data))
    meta = dump.with_name(dump.name + ".meta").read_text()
    damaged.with_name(damaged.name + ".meta").write_text(meta.replace(sha256_file(dump), sha256_file(damaged)))
    assert run_cli(["verify", str(damaged)], env, tmp_path).returncode == 0, "the checks pass: damage is in the data"

    result = run_cli(["restore", str(damaged), "--confirm", tma_db], env, tmp_path)
    _refused(result, live, pg, tma_db, "pg_restore failed")
    assert managed_databases(admin, "scratch") == []
    assert managed_databases(admin, "previous", tma_db) == []


def test_row_counts_that_do_not_match_meta_abort_before_the_swap(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    change_live(pg, tma_db)
    live = digests(pg, tma_db)
    meta_path = dump.with_name(dump.name + ".meta")
    meta_path.write_text(meta_path.read_text().replace("public.users=50", "public.users=51"))
    result = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path)
    _refused(result, live, pg, tma_db, "row counts differ")
    assert "public.users: .meta 51, restored 50" in result.stderr
    assert managed_databases(admin, "scratch") == []


def test_a_client_in_an_open_transaction_is_disconnected_at_the_swap(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    client = pg.connect(tma_db)
    client.execute("SELECT count(*) FROM users")  # an open transaction holding a lock
    try:
        result = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path)
        assert result.returncode == 0, result.output
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
    finally:
        client.close()
    assert digests(pg, tma_db) == at_backup
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


def test_restore_keeps_encoding_collation_pgboss_and_extensions(pg, admin, backup_dir, tmp_path):
    from tests.conftest import base_env

    name = "tma_latin1_restore"
    tma_cloud.drop_database(admin, name)
    tma_cloud.create_database(admin, name, template="template0", encoding="LATIN1", lc_collate="C", lc_ctype="C")
    try:
        with pg.connect(name, autocommit=True) as connection:
            tma_cloud.create_schema(connection)
            tma_cloud.populate(connection, users=10)
        env = base_env(pg, backup_dir, DB_NAME=name)
        assert run_cli(["backup"], env, tmp_path).returncode == 0
        dump, _ = only_backup(backup_dir, name)
        result = run_cli(["restore", str(dump), "--confirm", name], env, tmp_path)
        assert result.returncode == 0, result.output
        row = admin.execute("SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database"
                            " WHERE datname = %s", (name,)).fetchone()
        assert row == ("LATIN1", "C", "C")
        with pg.connect(name) as connection:
            assert connection.execute("SELECT count(*) FROM pgboss.job").fetchone()[0] == 20
            extensions = {r[0] for r in connection.execute("SELECT extname FROM pg_extension")}
            assert {"pg_trgm", "pgcrypto"} <= extensions
    finally:
        tma_cloud.drop_database(admin, name)
        for kept in managed_databases(admin, "previous"):
            tma_cloud.drop_database(admin, kept)


def test_in_place_mode_warns_and_restores(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    result = run_cli(["restore", str(dump), "--confirm", tma_db, "--mode", "in-place"], env, tmp_path)
    assert result.returncode == 0, result.output
    assert "[WARN]" in result.stderr and "EMPTY" in result.stderr
    assert digests(pg, tma_db) == at_backup
    assert managed_databases(admin, "previous", tma_db) == []


@pytest.mark.slow
def test_drill_passes_then_fails_on_a_wrong_count_and_drops_its_scratch_both_times(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    live = digests(pg, tma_db)
    result = run_cli(["drill"], env, tmp_path)
    assert result.returncode == 0, result.output
    assert "Drill passed" in result.stderr
    assert managed_databases(admin, "drill") == []
    status = run_cli(["status"], env, tmp_path)
    assert "Last drill : passed" in status.stderr

    meta_path = dump.with_name(dump.name + ".meta")
    meta_path.write_text(meta_path.read_text().replace("pgboss.job=100", "pgboss.job=99"))
    result = run_cli(["drill", str(dump)], env, tmp_path)
    assert result.returncode == 1
    assert "row counts differ" in error_lines(result.stderr)[0]
    assert managed_databases(admin, "drill") == []
    assert digests(pg, tma_db) == live
    status = run_cli(["status"], env, tmp_path)
    assert "Last drill : FAILED" in status.stderr


def test_token_is_rejected_without_a_broker_and_prepare_needs_one(backed_up, tmp_path):
    dump, env = backed_up
    result = run_cli(["restore", "--token", "abc", "--confirm", "x"], env, tmp_path)
    assert result.returncode == 2 and "needs CELERY_BROKER_URL" in error_lines(result.stderr)[0]
    result = run_cli(["restore", str(dump), "--prepare"], env, tmp_path)
    assert result.returncode == 2 and "needs CELERY_BROKER_URL" in error_lines(result.stderr)[0]


def test_backup_files_are_private(backed_up, backup_dir):
    dump, _ = backed_up
    assert os.stat(dump).st_mode & 0o777 == 0o600
    assert os.stat(dump.with_name(dump.name + ".meta")).st_mode & 0o777 == 0o600
    assert os.stat(backup_dir).st_mode & 0o077 == 0


def test_database_settings_grants_and_comment_survive_the_swap_and_the_rollback(pg, admin, backed_up, tma_db, tmp_path):
    dump, env = backed_up
    admin.execute("DROP ROLE IF EXISTS tma_app_reader")
    admin.execute("CREATE ROLE tma_app_reader")
    admin.execute(f'ALTER DATABASE "{tma_db}" SET search_path = pgboss, public')
    admin.execute(f'ALTER DATABASE "{tma_db}" SET work_mem = \'64MB\'')
    admin.execute(f'REVOKE ALL ON DATABASE "{tma_db}" FROM PUBLIC')
    admin.execute(f'GRANT CONNECT ON DATABASE "{tma_db}" TO tma_app_reader')
    admin.execute(f"COMMENT ON DATABASE \"{tma_db}\" IS 'TMA Cloud production'")

    def access() -> tuple:
        settings = admin.execute(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = %s AND s.setrole = 0", (tma_db,)).fetchone()
        acl = admin.execute("SELECT datacl::text, shobj_description(oid, 'pg_database') FROM pg_database"
                            " WHERE datname = %s", (tma_db,)).fetchone()
        return settings, acl

    before = access()
    try:
        result = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path)
        assert result.returncode == 0, result.output
        assert access() == before
        with pg.connect(tma_db) as connection:
            assert connection.execute("SHOW search_path").fetchone()[0] == "pgboss, public"
        result = run_cli(["rollback", "--database", tma_db, "--confirm", tma_db], env, tmp_path)
        assert result.returncode == 0, result.output
        assert access() == before
    finally:
        admin.execute(f'COMMENT ON DATABASE "{tma_db}" IS NULL')
        for name in managed_databases(admin, "previous"):
            tma_cloud.drop_database(admin, name)
        admin.execute(f'REVOKE ALL ON DATABASE "{tma_db}" FROM tma_app_reader')
        admin.execute("DROP ROLE IF EXISTS tma_app_reader")


@pytest.mark.slow
def test_the_postgres_database_itself_restores_and_rolls_back(backup_dir, tmp_path):
    """`postgres` is where the swap is normally administered from; restoring it administers from
    template1 instead. On a cluster of its own: the swap ends every session on `postgres`."""
    try:
        server = services.start_postgres()
    except services.ServiceUnavailable as error:
        _unavailable(str(error))
    try:
        with server.connect(autocommit=True) as connection:
            connection.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{TEST_PASSWORD}'")
            connection.execute("CREATE TABLE app_settings (key text PRIMARY KEY, value text)")
            connection.execute("INSERT INTO app_settings VALUES ('theme', 'dark')")
        env = base_env(server, backup_dir, DB_NAME="postgres")
        result = run_cli(["backup"], env, tmp_path)
        assert result.returncode == 0, result.output
        dump, meta = only_backup(backup_dir, "postgres")
        assert meta.row_counts == {"public.app_settings": 1}

        def rows() -> list[tuple[str, str]]:
            with server.connect("postgres") as connection:
                return connection.execute("SELECT key, value FROM app_settings ORDER BY key").fetchall()

        with server.connect(autocommit=True) as connection:
            connection.execute("INSERT INTO app_settings VALUES ('locale', 'de')")
        result = run_cli(["restore", str(dump), "--confirm", "postgres"], env, tmp_path)
        assert result.returncode == 0, result.output
        assert rows() == [("theme", "dark")]
        with server.connect("template1") as connection:
            kept = connection.execute("SELECT datname FROM pg_database WHERE datname LIKE 'postgres\\_\\_pre\\_restore\\_%'").fetchall()
        assert len(kept) == 1

        result = run_cli(["rollback", "--database", "postgres", "--confirm", "postgres"], env, tmp_path)
        assert result.returncode == 0, result.output
        assert rows() == [("locale", "de"), ("theme", "dark")]
    finally:
        server.stop("immediate")



INPLACE_COMMENT = "TMA Cloud production, restored in place"


def give_own_access(admin, database: str) -> None:
    """Settings (one list-valued), GRANTs and a comment that a dump of `database` does not hold."""
    admin.execute("DROP ROLE IF EXISTS tma_inplace_reader")
    admin.execute("DROP ROLE IF EXISTS tma_inplace_outsider")
    admin.execute("CREATE ROLE tma_inplace_reader")
    admin.execute("CREATE ROLE tma_inplace_outsider")
    admin.execute(f'ALTER DATABASE "{database}" SET search_path TO a, public')
    admin.execute(f"ALTER DATABASE \"{database}\" SET work_mem = '48MB'")
    admin.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
    admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO tma_inplace_reader')
    admin.execute(f"COMMENT ON DATABASE \"{database}\" IS '{INPLACE_COMMENT}'")


def drop_own_access_roles(admin, database: str) -> None:
    admin.execute(f'REVOKE ALL ON DATABASE "{database}" FROM tma_inplace_reader')
    admin.execute("DROP ROLE IF EXISTS tma_inplace_reader")
    admin.execute("DROP ROLE IF EXISTS tma_inplace_outsider")


def database_access(admin, database: str) -> tuple:
    """Settings exactly, GRANTs as a set (datacl's order is not meaningful), comment, who may connect."""
    settings = admin.execute(
        "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
        " WHERE d.datname = %s AND s.setrole = 0", (database,)).fetchone()
    grants = admin.execute(
        "SELECT coalesce(pg_get_userbyid(nullif(a.grantee, 0)), 'PUBLIC'), a.privilege_type, a.is_grantable"
        " FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s ORDER BY 1, 2", (database,)).fetchall()
    description = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                                (database,)).fetchone()[0]
    connect = tuple(admin.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')", (role, database)).fetchone()[0]
                    for role in ("tma_inplace_reader", "tma_inplace_outsider"))
    return settings, grants, description, connect


def test_in_place_restore_keeps_the_live_databases_settings_grants_and_comment(pg, admin, backed_up, tma_db, tmp_path):
    """In-place mode drops the live database: it reads these before the drop and gives them to the
    recreated one; the swap marker it sets before the drop does not survive."""
    dump, env = backed_up
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    give_own_access(admin, tma_db)
    before = database_access(admin, tma_db)
    assert before[0] == (["search_path=a, public", "work_mem=48MB"],)
    assert ("PUBLIC", "CONNECT", False) not in before[1] and ("PUBLIC", "TEMPORARY", False) in before[1]
    assert ("tma_inplace_reader", "CONNECT", False) in before[1]
    assert before[2:] == (INPLACE_COMMENT, (True, False))
    try:
        result = run_cli(["restore", str(dump), "--confirm", tma_db, "--mode", "in-place"], env, tmp_path)
        assert result.returncode == 0, result.output
        assert database_access(admin, tma_db) == before
        assert digests(pg, tma_db) == at_backup
        with pg.connect(tma_db) as connection:
            assert connection.execute("SHOW search_path").fetchone()[0] == "a, public"
            assert connection.execute("SHOW work_mem").fetchone()[0] == "48MB"
            assert connection.execute("SELECT current_setting('tma_backup.swap_in_progress', true)").fetchone()[0] is None
    finally:
        drop_own_access_roles(admin, tma_db)


def test_in_place_restore_of_a_read_only_database_restores_it_and_keeps_it_read_only(pg, admin, backed_up, tma_db, tmp_path):
    """The settings are given after pg_restore, as in swap mode: before it, this one would make pg_restore
    fail on an empty database."""
    dump, env = backed_up
    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    admin.execute(f'ALTER DATABASE "{tma_db}" SET default_transaction_read_only = on')
    for mode in ("in-place", "swap"):
        result = run_cli(["restore", str(dump), "--confirm", tma_db, "--mode", mode], env, tmp_path)
        assert result.returncode == 0, result.output
        assert digests(pg, tma_db) == at_backup
        with pg.connect(tma_db) as connection:
            assert connection.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


@pytest.mark.parametrize("failure", ["pg_restore failed", "row counts differ"])
def test_a_failed_in_place_restore_leaves_the_settings_grants_and_comment_in_place(pg, admin, backed_up, backup_dir,
                                                                                   tma_db, tmp_path, failure):
    """The database is empty after a failed in-place restore (the CLI warned), but it keeps its access, so
    that the next restore carries it on."""
    dump, env = backed_up
    give_own_access(admin, tma_db)
    before = database_access(admin, tma_db)
    meta = dump.with_name(dump.name + ".meta").read_text()
    if failure == "pg_restore failed":
        target = backup_dir / f"{tma_db}_20000101T000005Z.dump"
        data = bytearray(dump.read_bytes())
        for offset in range(len(data) // 2, len(data) // 2 + 64):  # corrupt table data, keep the TOC readable
            data[offset] ^= 0x5A
        target.write_bytes(bytes(data))
        target.with_name(target.name + ".meta").write_text(meta.replace(sha256_file(dump), sha256_file(target)))
    else:
        target = dump
        dump.with_name(dump.name + ".meta").write_text(meta.replace("public.users=50", "public.users=51"))
    try:
        result = run_cli(["restore", str(target), "--confirm", tma_db, "--mode", "in-place"], env, tmp_path)
        assert result.returncode == 1, result.output
        assert failure in error_lines(result.stderr)[0]
        assert database_access(admin, tma_db) == before
    finally:
        drop_own_access_roles(admin, tma_db)
