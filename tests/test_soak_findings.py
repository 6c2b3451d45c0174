"""Defects the chaos soak found (issue 25, bench/soak/), one regression test each, each reproduced with
the soak's own faults (real processes, a real S3 server, real PostgreSQL), without the soak's hour.
The rows in docs/reliability.md, "The chaos soak", name these tests."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.faults import finished_within, private_stack
from tests.helpers import dump_waiting_on_lock, table_locked, wait_for
from tests.s3_server import S3Server
from tests.test_repository import local_repository, restic_init, s3_repository
from tests.test_restore import digests
from tests.test_uploads import make_site

pytestmark = pytest.mark.slow


def test_latest_with_uploads_restores_the_newest_whole_set_when_a_newer_one_lacks_its_uploads(
        pg: services.PostgresServer, s3: S3Server, restic_bin: str, tma_db: str, tmp_path: Path) -> None:
    """The S3 server away while a run captured the uploads, back for its offsite link: the run sends its
    database part and fails ("the set lacks its uploads"). `restore --from-repository latest
    --with-uploads` (the runbook's command) then took that set and refused: "has no uploads in its set
    …; restore the database alone", which on a fresh machine means losing every upload. It restores the
    newest whole set instead, and says which newer set it passed over and why."""
    repository = restic_init(restic_bin, s3_repository(s3, tmp_path / "cache"))
    site = make_site(pg, tma_db, tmp_path, repository)
    settings = {"TMA_ENV_FILE": site.env["TMA_ENV_FILE"], **repository.settings}
    (tmp_path / "stack").mkdir()
    with private_stack(pg, tma_db, tmp_path / "stack", **settings) as stack:
        stack.start_worker(pause="slow-checksum:8")  # the checksum link waits: time to bring S3 back
        whole = stack.start_backup()
        finished_within(whole, 180)
        assert whole.returncode == 0, whole.stderr
        (stack.signals / "checksum").unlink()
        state, files = digests(pg, tma_db), tma_cloud.folder_digests(site.folder)

        with pg.connect(tma_db, autocommit=True) as connection:
            connection.execute("UPDATE users SET name = 'changed after the whole set' WHERE id = 1")
        s3.kill()
        try:
            partial = stack.start_backup()
            stack.wait_for_signal("checksum", timeout=120)  # the capture met the server down
        finally:
            s3.start()
        _, stderr = finished_within(partial, 180)
        assert partial.returncode == 1 and "lacks its uploads" in stderr, stderr

        result = run_cli(["restore", "--from-repository", "latest", "--with-uploads", "--confirm", tma_db],
                         stack.env, tmp_path, timeout=300)
        assert result.returncode == 0, result.output
        assert "without its uploads" in result.stderr, result.stderr
        assert digests(pg, tma_db) == state
        assert tma_cloud.folder_digests(site.folder) == files


def test_tma_clouds_purge_of_an_upload_past_its_15_days_in_the_trash_during_a_backup_is_no_missing_upload(
        pg: services.PostgresServer, restic_bin: str, tma_db: str, tmp_path: Path) -> None:
    """TMA Cloud purges an upload 15 days after it went to the trash: the blob, then the row. A purge that
    falls between the dump's snapshot (the row still there) and the uploads capture (the blob gone) made
    the set "lack" that upload: a `[WARN] … missing` in the run, `status` exit 1 ("lacks 1 upload(s) the
    database references: they would not come back with a restore") until the next set: in the soak, a
    third of the status polls. That upload was about to go (docs/DESIGN: "a row without its blob is a
    loss, except for a trashed row past its 15 days"): the default UPLOADS_REFERENCES_QUERY leaves such
    rows out. An upload in the trash for less than 15 days is still one the set must hold."""
    repository = restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))
    site = make_site(pg, tma_db, tmp_path, repository)
    purged, recent = site.uploads.paths[-1], site.uploads.paths[-2]
    with pg.connect(tma_db, autocommit=True) as connection:
        connection.execute("UPDATE files SET deleted_at = now() - interval '16 days' WHERE path = %s", (purged,))
        connection.execute("UPDATE files SET deleted_at = now() - interval '14 days' WHERE path = %s", (recent,))
    with pg.connect(autocommit=True) as admin:
        with table_locked(pg, tma_db, "audit_log"):  # pg_dump waits, inside its snapshot
            backup = subprocess.Popen([services.TMA_BACKUP, "backup"], env=site.env, cwd=site.cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), timeout=60, what="pg_dump to wait on the lock")
            (site.folder / purged).unlink()  # TMA's purge: the blob, then the row
            with pg.connect(tma_db, autocommit=True) as connection:
                connection.execute("DELETE FROM files WHERE path = %s", (purged,))
        out, err = backup.communicate(timeout=240)
    assert backup.returncode == 0, out + err
    assert "missing" not in err.replace("0 missing", ""), err
    status = run_cli(["status"], site.env, site.cwd)
    assert "lacks" not in status.output, status.output

    # the same with an upload 14 days in the trash: still one the set must hold, and status says it lacks it
    with pg.connect(autocommit=True) as admin:
        with table_locked(pg, tma_db, "audit_log"):
            backup = subprocess.Popen([services.TMA_BACKUP, "backup"], env=site.env, cwd=site.cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), timeout=60, what="pg_dump to wait on the lock")
            (site.folder / recent).unlink()
        out, err = backup.communicate(timeout=240)
    assert backup.returncode == 0, out + err
    assert f"1 referenced upload(s) missing from the set: {recent}" in err, err
    assert "lacks 1 upload(s)" in run_cli(["status"], site.env, site.cwd).output


@pytest.mark.parametrize("from_repository", [True, False], ids=["latest set", "newest local backup"])
def test_a_scheduled_drill_with_nothing_to_drill_yet_is_skipped_not_a_failed_drill(
        pg: services.PostgresServer, restic_bin: str, tma_db: str, tmp_path: Path, from_repository: bool) -> None:
    """A fresh install whose first scheduled drill comes before its first backup (every soak: the drill
    schedule starts with it). The drill found no set (no backup) and was recorded as failed: `status` exit
    1, "the last restore drill … failed: the repository holds no set", until the next scheduled drill
    passes (by default a week later). Nothing to drill is no failed drill: a scheduled one skips and
    records nothing (`status` keeps saying no drill was recorded yet, a warning). A drill asked for by
    hand still fails, saying why."""
    from tests.helpers import settings_for
    from worker.pg.executors import choose_executor
    from worker.restore import drills

    repository = restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))
    site = make_site(pg, tma_db, tmp_path, repository, BACKUP_DRILL_FROM_REPOSITORY=str(from_repository).lower())
    settings = settings_for(site.env)
    reference = "latest" if from_repository else None
    result = drills.run_and_record(settings, choose_executor(settings), None, None, "scheduled-drill",
                                   scheduled=True, from_repository=reference)
    assert "skipped" in result and "nothing to drill" in result["skipped"], result
    status = run_cli(["status"], site.env, site.cwd)
    assert "last restore drill" not in status.output, status.output
    assert "Last drill : none recorded" in status.output, status.output
    by_hand = run_cli(["drill", *(["--from-repository", "latest"] if from_repository else [])], site.env, site.cwd)
    assert by_hand.returncode == 1, by_hand.output


def test_a_scheduled_drill_that_meets_a_running_backup_waits_for_it_instead_of_skipping(
        pg: services.PostgresServer, redis_server: services.RedisServer, tma_db: str, tmp_path: Path) -> None:
    """A scheduled drill that found the database busy skipped. With sets every few minutes (frequent sets)
    the drill's minute is a backup's minute too: in the soak 4 of 6 scheduled drills met the backup of
    their minute and were skipped, and with BACKUP_SCHEDULE='*/15 * * * *' the default weekly drill (Sunday
    04:00) meets the 04:00 set every week: no drill ever passes and `status` fails ("no drill passed
    since the last two scheduled drills"). A scheduled drill now waits for a running backup to end."""
    from tests.conftest import base_env
    from tests.helpers import lock_of, settings_for
    from worker.pg.executors import choose_executor
    from worker.restore import drill_record, drills

    backups = tmp_path / "backups"
    env = base_env(pg, backups, DB_NAME=tma_db)
    made = run_cli(["backup"], env, tmp_path)
    assert made.returncode == 0, made.output
    settings = settings_for({**env, "CELERY_BROKER_URL": redis_server.url})
    backup = lock_of(settings, tma_db, "a-running-backup")
    backup.acquire()
    releaser = threading.Timer(6, backup.release)
    releaser.start()
    try:
        started = time.monotonic()
        result = drills.run_and_record(settings, choose_executor(settings), None, None, "scheduled-drill",
                                       scheduled=True)
    finally:
        releaser.join()
    assert "skipped" not in result, result
    assert time.monotonic() - started >= 5, "it waited for the backup"
    assert (drill_record.last_drill(settings, tma_db) or {}).get("result") == "pass"
