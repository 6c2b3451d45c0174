"""Frequent whole sets (issue 24): a run with nothing to do makes no set but records its check; a run
after a small change sends only the change; a day of sets every 15 minutes thins out to hourly, then
daily; the recovery point is a number status holds to MAX_RPO; sets know TMA Cloud's version.

Real services: the session's PostgreSQL, restic with a local repository, the CLI in-process, a local
receiver for the healthcheck pings.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests import tma_cloud
from tests.conftest import run_cli
from tests.helpers import error_lines, settings_for
from tests.test_notify import receiver  # noqa: F401  (the fixture)
from tests.test_repository import craft, send_crafted, snapshots, tag_value
from tests.test_uploads import (
    _no_kept_copies_left,  # noqa: F401  (autouse)
    add_upload,
    backup,
    repo,  # noqa: F401
    site,  # noqa: F401
)
from worker.archive import catalogue
from worker.coordination.schedule import longest_gap, max_rpo
from worker.health.facts import status_facts

pytestmark = pytest.mark.slow


def if_changed(site) -> object:
    return run_cli(["backup", "--if-changed"], site.env, site.cwd)


def dumps(site) -> list[str]:
    return sorted(path.name for path in site.backup_dir.glob(f"{site.database}_*.dump"))


def test_an_unchanged_run_makes_no_set_records_its_check_and_pings(pg, site, restic_bin, receiver):
    site.env.update(HEALTHCHECK_URL=receiver.healthcheck_url(), NOTIFY_TIMEOUT="5")
    backup(site)
    before = (dumps(site), len(snapshots(restic_bin, site.repository)))
    with pg.connect(site.database, autocommit=True) as connection:  # TMA Cloud's job queue writes on its own
        connection.execute("INSERT INTO pgboss.job (name, data) VALUES ('thumbnail', '{}')")
        connection.execute("DELETE FROM pgboss.job WHERE id IN (SELECT id FROM pgboss.job LIMIT 1)")

    quiet = if_changed(site)
    assert quiet.returncode == 0, quiet.output
    assert "Unchanged  : nothing changed" in quiet.stderr, quiet.output
    assert error_lines(quiet.stderr) == []
    assert (dumps(site), len(snapshots(restic_bin, site.repository))) == before, "no set, nothing sent"
    assert [kind for kind, _ in receiver.pings()][-1] == "success", receiver.pings()
    assert "nothing changed" in receiver.pings()[-1][1]
    facts = status_facts(settings_for(site.env), site.database)
    assert facts["backup"]["unchanged_checked_at"] is not None and facts["ok"], facts["problems"]
    later = status_facts(settings_for(site.env), site.database, now=datetime.now(timezone.utc) + timedelta(hours=25))
    assert later["ok"], "the check keeps the newest set current for a day: " + str(later["problems"])

    for change, expected in (("a row", lambda: pg_write(pg, site, "INSERT INTO users (email, name) VALUES "
                                                                     "('new@example.com', 'New')")),
                             ("an upload", lambda: add_file(site)),
                             ("a column", lambda: pg_write(pg, site, "ALTER TABLE users ADD COLUMN note text"))):
        expected()
        changed = if_changed(site)
        assert changed.returncode == 0, changed.output
        assert "Unchanged" not in changed.stderr, f"{change}: {changed.output}"
        assert len(dumps(site)) == len(before[0]) + 1, change
        before = (dumps(site), len(snapshots(restic_bin, site.repository)))
        assert if_changed(site).returncode == 0 and dumps(site) == before[0], f"after {change}: unchanged again"


def test_a_server_that_counts_no_rows_takes_a_set_every_run(pg, site, restic_bin):
    """With `track_counts = off` (here for the database: every new session of it) the row counters never
    move. A row written then must not look like nothing: every run takes a set."""
    backup(site)
    with pg.connect(autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{site.database}" SET track_counts = off')
    try:
        pg_write(pg, site, "INSERT INTO users (email, name) VALUES ('uncounted@example.com', 'Not counted')")
        before = dumps(site)
        run = if_changed(site)
        assert run.returncode == 0, run.output
        assert "Unchanged" not in run.stderr, run.output
        assert len(dumps(site)) == len(before) + 1, "a set, with the row"
    finally:
        with pg.connect(autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{site.database}" RESET track_counts')


def pg_write(pg, site, statement: str) -> None:
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute(statement)


def add_file(site) -> None:
    tma_cloud.write_blob(site.folder / "a-late-upload.pdf", 900)


def test_a_run_after_a_small_change_sends_only_the_change(pg, site, restic_bin):
    _, first, first_meta = backup(site)
    total = int(first_meta.extra["uploads_bytes"])
    add_upload(pg, site, plain=5000)
    _, second, meta = backup(site)
    added = int(meta.extra["uploads_bytes_added"])
    assert 5000 <= added <= 5000 + 40_000 and added < total, (added, total)
    sets = {tag_value(item, "at:"): item for item in snapshots(restic_bin, site.repository)
            if tag_value(item, "part:") == "database"}
    database_added = int(str(tag_value(sets[meta.timestamp], "added:")))
    assert database_added <= second.stat().st_size + 40_000, "the dump at most (restic chunks it anew)"


def test_a_day_of_15_minute_sets_thins_out_to_hourly_then_daily(pg, repo, tma_db, tmp_path, restic_bin):
    """The default rules scaled down (REPOSITORY_KEEP_WITHIN=1h for 1d, _WITHIN_HOURLY=3h for 2d, daily 3),
    on sets every 15 minutes over 5 hours and one on each of the 4 days before, applied by the prune
    link's own retention."""
    from tests.conftest import base_env
    from tests.helpers import only_backup
    from worker.repository.maintenance import forget
    from worker.repository.restic import Restic

    source_dir = tmp_path / "source"
    made = run_cli(["backup"], base_env(pg, source_dir, DB_NAME=tma_db), tmp_path)
    assert made.returncode == 0, made.output
    source, _ = only_backup(source_dir, tma_db)
    env = base_env(pg, tmp_path / "crafted", DB_NAME=tma_db, REPOSITORY_KEEP_WITHIN="1h",
                   REPOSITORY_KEEP_WITHIN_HOURLY="3h", REPOSITORY_KEEP_DAILY="3", REPOSITORY_KEEP_WEEKLY="0",
                   REPOSITORY_KEEP_MONTHLY="0", **repo.settings)
    newest = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
    stamps = [catalogue.utc_timestamp(newest - timedelta(minutes=15 * step)) for step in range(21)]
    stamps += [catalogue.utc_timestamp(newest - timedelta(days=day, hours=2)) for day in range(1, 5)]
    for stamp in sorted(stamps):
        send_crafted(env, craft(source, tma_db, tmp_path / "crafted", stamp), tma_db)
    settings = settings_for(env)
    server_id = str(tag_value(snapshots(restic_bin, repo)[0], "server:"))
    forget(Restic(settings), settings, tma_db, server_id)
    kept = sorted(str(tag_value(item, "at:")) for item in snapshots(restic_bin, repo))
    within_hour = ["20260310T111500Z", "20260310T113000Z", "20260310T114500Z", "20260310T120000Z"]  # 11:00 is not within
    hourly = ["20260310T094500Z", "20260310T104500Z"]  # (and 11:45, 12:00): the newest of each hour within 3h
    daily = ["20260308T100000Z", "20260309T100000Z"]  # (and 12:00): the newest of the 3 newest days
    assert kept == sorted({*within_hour, *hourly, *daily}), kept


def test_the_recovery_point_is_held_to_max_rpo_and_a_check_keeps_it_current(pg, site):
    site.env["BACKUP_SCHEDULE"] = "*/15 * * * *"
    assert longest_gap("*/15 * * * *") == timedelta(minutes=15)
    assert max_rpo("*/15 * * * *", "") == timedelta(minutes=25)
    backup(site)
    settings = settings_for(site.env)
    now = datetime.now(timezone.utc)
    fresh = status_facts(settings, site.database, now=now + timedelta(minutes=5))
    assert fresh["ok"] and fresh["repository"]["max_rpo_hours"] == pytest.approx(25 / 60, abs=0.01), fresh["problems"]
    late = status_facts(settings, site.database, now=now + timedelta(minutes=40))
    assert not late["ok"] and "over MAX_RPO (25 min, from BACKUP_SCHEDULE" in late["repository"]["problem"], late
    assert if_changed(site).returncode == 0  # nothing changed: the check moves the recovery point on
    after = status_facts(settings, site.database, now=datetime.now(timezone.utc) + timedelta(minutes=20))
    assert after["ok"], after["problems"]
    assert after["repository"]["recovery_point"] > after["repository"]["timestamp"]


def test_a_set_knows_tma_clouds_version_and_a_restore_under_an_older_one_warns_first(pg, site, restic_bin):
    with pg.connect(site.database, autocommit=True) as connection:
        connection.execute("CREATE TABLE migrations (version varchar(255) PRIMARY KEY, applied_at timestamptz"
                           " NOT NULL DEFAULT now())")
        connection.execute("INSERT INTO migrations (version) VALUES ('030_add_recursive_cte_indexes'),"
                           " ('031_create_client_heartbeats')")
    _, dump, meta = backup(site)
    assert meta.extra["tma_migration"] == "031_create_client_heartbeats"
    [database_part] = [item for item in snapshots(restic_bin, site.repository) if tag_value(item, "part:") == "database"]
    assert tag_value(database_part, "tma:") == "031_create_client_heartbeats"
    listed = [json.loads(line) for line in run_cli(["repository", "list", "--json"], site.env, site.cwd)
              .stdout.splitlines()]
    assert listed[0]["tma_migration"] == "031_create_client_heartbeats"
    with pg.connect(site.database, autocommit=True) as connection:  # the live TMA Cloud is older
        connection.execute("DELETE FROM migrations WHERE version = '031_create_client_heartbeats'")
    restored = run_cli(["restore", str(dump), "--confirm", site.database], site.env, site.cwd)
    assert restored.returncode == 0, restored.output
    [warning] = [line for line in restored.stderr.splitlines() if "NEWER TMA Cloud" in line]
    assert "031_create_client_heartbeats" in warning and "030_add_recursive_cte_indexes" in warning
    assert restored.stderr.index(warning) < restored.stderr.index("Restore Complete"), "before the restore"


def test_after_a_run_that_could_not_send_the_next_unchanged_run_sends_all_the_same(site, restic_bin, tmp_path):
    """A good run, then one whose repository was away (its backup complete here, not sent): the next
    run with nothing changed since must not skip: the last good run's record no longer names the newest
    local backup. It takes a set and sends the one the failed run could not."""
    backup(site)
    away = run_cli(["backup"], {**site.env, "BACKUP_REPOSITORY": str(tmp_path / "repository-away")}, site.cwd)
    assert away.returncode == 1, away.output
    unsent = dumps(site)[-1]
    again = if_changed(site)
    assert again.returncode == 0, again.output
    assert "Unchanged" not in again.stderr, again.output
    sent = {tag_value(item, "at:") for item in snapshots(restic_bin, site.repository)}
    assert catalogue.timestamp_of(site.backup_dir / unsent, site.database) in sent
