"""Autovacuum and autoanalyze must not make a 15-minute schedule take a set every run: VACUUM, ANALYZE and
VACUUM (FREEZE) (what they run) leave the database's change fingerprint (worker/backup/unchanged.py) as
it was, while a row written afterwards still changes it."""

from __future__ import annotations

from tests.helpers import wait_for
from worker.backup.unchanged import database_fingerprint

IGNORE = ["pgboss.*", "public.client_heartbeats"]


def _counted(pg, database: str) -> bool:
    with pg.connect(database, autocommit=True) as connection:
        rows = dict(connection.execute(
            "SELECT relname, n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname IN ('users', 'audit_log')"
        ).fetchall())
    return rows.get("users", 0) > 0 and rows.get("audit_log", 0) > 0


def _fingerprint(pg, database: str) -> str:
    with pg.connect(database, autocommit=True) as connection:
        return database_fingerprint(connection, IGNORE)


def test_vacuum_and_analyze_leave_the_fingerprint_alone_and_a_row_still_moves_it(pg, tma_db):
    with pg.connect(tma_db, autocommit=True) as writer:  # dead rows for VACUUM to remove
        writer.execute("UPDATE users SET name = name || ' (renamed)' WHERE id % 3 = 0")
        writer.execute("DELETE FROM audit_log WHERE id % 5 = 0")
    wait_for(lambda: _counted(pg, tma_db), timeout=30, what="the writes to reach the statistics")
    before = _fingerprint(pg, tma_db)
    for maintenance in ("VACUUM", "ANALYZE", "VACUUM (ANALYZE)", "VACUUM (FREEZE, ANALYZE)"):
        with pg.connect(tma_db, autocommit=True) as connection:
            connection.execute(maintenance)
        assert _fingerprint(pg, tma_db) == before, f"{maintenance} changed the fingerprint: a set for nothing"

    with pg.connect(tma_db, autocommit=True) as writer:
        writer.execute("INSERT INTO users (email, name) VALUES ('after-vacuum@example.com', 'After vacuum')")
    wait_for(lambda: _fingerprint(pg, tma_db) != before, timeout=30, what="the new row to change the fingerprint")
