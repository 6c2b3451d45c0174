"""Faults on the backup side, against a real PostgreSQL, real Redis servers and real Celery worker
processes: workers killed with SIGKILL at each link, Redis and PostgreSQL restarted mid-chain, full,
missing and read-only backup folders, two beats by mistake. After each: no complete-looking backup that
is not one, earlier backups untouched, the lock free within its timeout, the next backup fine, and one
clear line for the operator. See docs/reliability.md for the table these tests prove.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.faults import (
    PAUSE_ENV,
    BeatSlot,
    FaultWorker,
    Follower,
    Stack,
    fill,
    finished_within,
    free_bytes,
    kill_worker_and_tools,
    private_stack,
    remount,
    tmpfs,
)
from tests.helpers import (
    FirstSeen,
    backups_in,
    dump_waiting_on_lock,
    error_lines,
    leftovers,
    only_backup,
    sha256_file,
    table_locked,
    wait_for,
)
from worker.archive import catalogue

LOCK_TIMEOUT = 6  # seconds; production default 60. Short so that expiry is measured, not assumed.


@pytest.fixture
def stack(pg: services.PostgresServer, tma_db: str, tmp_path: Path) -> Iterator[Stack]:
    """A private Redis and the workers this test starts, over the session's PostgreSQL."""
    with private_stack(pg, tma_db, tmp_path, BACKUP_LOCK_TIMEOUT=str(LOCK_TIMEOUT)) as created:
        yield created


def complete_backups(directory: Path, database: str) -> list[str]:
    return [entry.path.name for entry in catalogue.list_backups(directory, database) if entry.complete]


# ---------------------------------------------------------------------------------------------------
# Several chains on one worker


@contextmanager
def backups_on_one_worker_process(stack: Stack, pg: services.PostgresServer, tma_db: str,
                                  count: int) -> Iterator[tuple[FaultWorker, list[str], list[Follower]]]:
    """`count` databases (the test's and copies of its shape) backed up at once through one worker
    process whose checksum links take 5 s each: every chain's next link waits in the host's queue
    behind the others'. Yields the worker, the databases and their following CLIs; drops the copies."""
    databases = [tma_db] + [tma_cloud.create_populated(pg, f"{tma_db}_{number}") for number in range(1, count)]
    try:
        worker = FaultWorker("f0@host-f", {**stack.env, PAUSE_ENV: "slow-checksum:5"}, stack.root / "worker0.log")
        stack.workers.append(worker.start(["-c", "1"]))
        followers = [Follower([services.TMA_BACKUP, "backup"], {**stack.env, "DB_NAME": name}, stack.root)
                     for name in databases]
        try:
            yield worker, databases, followers
        finally:
            for follower in followers:
                follower.kill()
    finally:
        with pg.connect(autocommit=True) as admin:
            for name in databases[1:]:
                tma_cloud.drop_database(admin, name)


def test_chains_waiting_in_a_busy_queue_keep_their_locks_between_links(stack, pg, tma_db):
    """Backups of several databases at once on one worker process: each chain's next link waits in the
    host's queue behind the other chains' links, far longer than the lock's lease (every checksum link
    takes 5 s here, and LOCK_TIMEOUT is 6 s). The host's worker keeps the waiting chains' locks alive,
    so every chain finishes; a killed worker still frees them within the lease (the next test)."""
    with backups_on_one_worker_process(stack, pg, tma_db, 6) as (worker, databases, followers):
        for name, follower in zip(databases, followers, strict=True):
            _, stderr = finished_within(follower, 180)
            assert follower.returncode == 0, f"{name}: {stderr[-1500:]}"
        for name in databases:
            assert len(complete_backups(stack.backups, name)) == 1, name
            assert stack.redis().get(stack.lock_key(name)) is None, f"{name}: the lock is released at the end"
        assert "lost the lock" not in worker.log()


def test_a_killed_worker_frees_the_locks_of_chains_waiting_between_links_within_the_lease(stack, pg, tma_db):
    """Parked locks are renewed by the host's live workers only: SIGKILL the worker while chains wait
    in its queue, and every lock is free within LOCK_TIMEOUT, as for a chain killed mid-link."""
    with backups_on_one_worker_process(stack, pg, tma_db, 3) as (worker, databases, _):
        parked = f"tma_backup:parked:{stack.env['WORKER_HOST']}"
        wait_for(lambda: stack.redis().hlen(parked) >= 2, timeout=60, interval=0.05,
                 what="two chains to wait between links")
        kill_worker_and_tools(worker)
        killed_at = time.monotonic()
        wait_for(lambda: all(stack.redis().get(stack.lock_key(name)) is None for name in databases),
                 timeout=LOCK_TIMEOUT + 5, interval=0.05, what="the dead worker's locks to expire")
        assert time.monotonic() - killed_at <= LOCK_TIMEOUT + 1


# ---------------------------------------------------------------------------------------------------
# SIGKILL of the worker at each link


@pytest.mark.parametrize("point", ["dump", "verify", "meta-written"])
def test_a_worker_killed_mid_chain_leaves_no_backup_frees_the_lock_and_is_not_redelivered(
        point, stack, pg, admin, tma_db):
    """SIGKILL during the dump (pg_dump waiting on a table lock), during verify, and during meta (the
    `.meta` written, the `.partial` not yet renamed): nothing complete-looking is left; the lock expires
    within BACKUP_LOCK_TIMEOUT; the follower says it lost track instead of waiting for FOLLOW_TIMEOUT;
    the killed link is dropped (acked on receipt: task_acks_late is off), never redelivered; the next
    backup succeeds and removes the killed run's files."""
    worker = stack.start_worker(pause=None if point == "dump" else point)
    backups = stack.backups
    with table_locked(pg, tma_db) if point == "dump" else nullcontext():
        follower = stack.start_backup()
        if point == "dump":
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
            wait_for(lambda: list(backups.glob("*.dump.partial")), what="pg_dump's output file")
        else:
            stack.wait_for_signal(point)
        run_id = stack.lock_holder()
        assert run_id, "the running chain holds the database's lock"
        kill_worker_and_tools(worker)
        killed_at = time.monotonic()
        freed = FirstSeen(lambda: stack.lock_holder() is None)  # measured while the fresh worker starts

    assert complete_backups(backups, tma_db) == []
    assert backups_in(backups, tma_db) == [], "no file carries a final backup name"
    if point == "meta-written":
        assert list(backups.glob("*.dump.meta")), "killed between the .meta and the rename, as intended"

    assert stack.redis().hlen("unacked") == 0, "nothing is waiting to be redelivered"
    fresh = stack.start_worker()
    freed_after = freed.wait(timeout=LOCK_TIMEOUT + 10, what="the dead run's lock to expire") - killed_at
    assert freed_after <= LOCK_TIMEOUT + 1, f"lock freed {freed_after:.1f}s after the kill"
    assert "Received task" not in fresh.log(), "the killed link is dropped, not redelivered"

    result = run_cli(["backup"], stack.env, stack.root, timeout=120)
    assert result.returncode == 0, result.output

    _, stderr = finished_within(follower, max(0.0, killed_at + LOCK_TIMEOUT * 3 - time.monotonic()))
    assert follower.returncode == 1, stderr
    [line] = error_lines(stderr)
    assert "lost track" in line and "Traceback" not in stderr, stderr
    dump, _ = only_backup(backups, tma_db)
    # the good run's record for the next one (worker.backup.unchanged), and nothing of the killed run
    assert sorted(path.name for path in backups.iterdir() if not path.name.startswith(".last-set-")) == \
        [dump.name, dump.name + ".meta"] and len(list(backups.glob(".last-set-*.json"))) == 1, \
        "the killed run's partial files are gone"


def test_a_worker_killed_right_after_publishing_leaves_a_complete_verified_backup(stack, tma_db):
    """Killed after the rename `.partial` → `.dump` (before prune): the backup is complete and correct
    (it passed verify and checksum before the rename), `tma-backup verify` says so; the scratch counts
    file is removed by the next run; the lock expires."""
    worker = stack.start_worker(pause="published")
    follower = stack.start_backup()
    stack.wait_for_signal("published")
    kill_worker_and_tools(worker)
    killed_at = time.monotonic()
    freed = FirstSeen(lambda: stack.lock_holder() is None)  # measured while verify runs
    dump, meta = only_backup(stack.backups, tma_db)
    assert meta.sha256 == sha256_file(dump)
    checked = run_cli(["verify", "--local", str(dump)], stack.env, stack.root)
    assert checked.returncode == 0, checked.output
    assert freed.wait(timeout=LOCK_TIMEOUT + 10, what="lock expiry") - killed_at <= LOCK_TIMEOUT + 1

    stack.start_worker()
    result = run_cli(["backup"], stack.env, stack.root, timeout=120)
    assert result.returncode == 0, result.output
    _, stderr = finished_within(follower, max(0.0, killed_at + LOCK_TIMEOUT * 3 - time.monotonic()))
    assert follower.returncode == 1 and "lost track" in error_lines(stderr)[0], stderr
    assert len(complete_backups(stack.backups, tma_db)) == 2
    assert leftovers(stack.backups) == []


def test_a_checksum_that_outlasts_the_lock_timeout_keeps_the_lock(stack, tma_db):
    """Every link renews the lock while it works (a checksum of a large dump takes longer than
    BACKUP_LOCK_TIMEOUT), so a slow link is not mistaken for a dead one."""
    stack.start_worker(pause=f"slow-checksum:{LOCK_TIMEOUT + 1}")
    result = run_cli(["backup"], stack.env, stack.root, timeout=120)
    assert result.returncode == 0, result.output
    assert (stack.signals / "checksum").exists()
    only_backup(stack.backups, tma_db)


# ---------------------------------------------------------------------------------------------------
# Redis and PostgreSQL restarted


def test_redis_restarted_mid_dump_fails_the_chain_cleanly_and_the_follower_says_so(stack, pg, admin, tma_db):
    """The private Redis (no persistence: queues, results and the lock are all lost) is killed and
    restarted on the same port while pg_dump runs. The dump notices that its lock is gone at its next
    renewal, stops pg_dump and fails; the follower reports that within a bounded time; the worker
    reconnects and the next backup succeeds; the earlier backup is untouched."""
    worker = stack.start_worker()
    assert run_cli(["backup"], stack.env, stack.root).returncode == 0
    good, _ = only_backup(stack.backups, tma_db)
    before = sha256_file(good)
    with table_locked(pg, tma_db):
        follower = stack.start_backup()
        wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
        follower.wait_for_line("Target     :")  # the follower knows the run (see docs/reliability.md)
        stack.redis_server.stop()
        time.sleep(1)
        stack.redis_server.start()
        _, stderr = finished_within(follower, 60)  # with the table still locked: the dump stopped itself
    assert follower.returncode == 1, stderr
    assert len(error_lines(stderr)) == 1, stderr
    [line] = error_lines(stderr)
    assert "lock" in line or "lost track" in line, line
    assert "Traceback" not in stderr
    wait_for(lambda: not dump_waiting_on_lock(admin, tma_db), timeout=10, what="pg_dump to be stopped")
    assert backups_in(stack.backups, tma_db) == [good] and sha256_file(good) == before
    wait_for(lambda: leftovers(stack.backups) == [], timeout=10, what="the failed run's files to go")

    result = run_cli(["backup"], stack.env, stack.root, timeout=120)
    assert result.returncode == 0, result.output + worker.log()[-3000:]
    assert len(complete_backups(stack.backups, tma_db)) == 2 and sha256_file(good) == before


def test_postgres_restarted_during_a_dump_is_retried_with_backoff_and_the_backup_completes(
        stack, pg, admin, tma_db):
    worker = stack.start_worker()
    with table_locked(pg, tma_db):
        follower = stack.start_backup()
        wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
        run_id = stack.lock_holder()
        pg.stop("fast")
    try:
        wait_for(lambda: "Retry in 3s" in worker.log(), timeout=20, what="the dump task to schedule a retry")
        assert stack.lock_holder() == run_id, "the run keeps its lock while it waits to retry"
        assert leftovers(stack.backups) == [], "the failed attempt removed its partial files first"
    finally:
        pg.start()
    _, stderr = finished_within(follower, 60)
    assert follower.returncode == 0, stderr
    assert any(line.startswith("[WARN]") and "trying again" in line for line in stderr.splitlines()), stderr
    only_backup(stack.backups, tma_db)
    assert leftovers(stack.backups) == []
    assert stack.lock_holder() is None


def test_postgres_down_longer_than_the_retries_fails_cleanly_after_backing_off(stack, pg, admin, tma_db):
    worker = stack.start_worker()
    assert run_cli(["backup"], stack.env, stack.root).returncode == 0
    good, _ = only_backup(stack.backups, tma_db)
    before = sha256_file(good)
    try:
        with table_locked(pg, tma_db):
            follower = stack.start_backup()
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
            pg.stop("fast")
        stopped_at = time.monotonic()
        _, stderr = finished_within(follower, 60)
        failed_after = time.monotonic() - stopped_at
    finally:
        pg.start()
    assert follower.returncode == 1, stderr
    [line] = error_lines(stderr)
    assert "Connection refused" in line or "connect" in line, line
    assert "Traceback" not in stderr
    assert worker.log().count("Retry in") == 2, "BACKUP_RETRIES=2 (the default): three attempts"
    assert "Retry in 3s" in worker.log() and "Retry in 6s" in worker.log(), "exponential backoff"
    # the first attempt fails while the server shuts down, a moment before `stopped_at`
    assert failed_after >= 3 + 6 - 1, f"gave up after {failed_after:.1f}s, before backing off 3 s and 6 s"
    assert backups_in(stack.backups, tma_db) == [good] and sha256_file(good) == before
    assert leftovers(stack.backups) == []
    assert stack.lock_holder() is None, "the error callback released the lock"


# ---------------------------------------------------------------------------------------------------
# A full, read-only or missing BACKUP_DIR


def _add_incompressible_rows(pg: services.PostgresServer, database: str, megabytes: int) -> None:
    with pg.connect(database, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO files (owner_id, path, mime, content) SELECT 1, '/big', 'application/octet-stream',"
            " (SELECT string_agg(gen_random_bytes(1024), ''::bytea) FROM generate_series(1, %s))",
            (megabytes * 1024,))


def _remove_big_rows(pg: services.PostgresServer, database: str) -> None:
    with pg.connect(database, autocommit=True) as connection:
        connection.execute("DELETE FROM files WHERE path = '/big'")


def test_a_full_backup_folder_fails_cleanly_in_the_dump_and_in_meta_and_keeps_earlier_backups(stack, pg, tma_db):
    in_process = {**stack.env, "CELERY_BROKER_URL": ""}
    with tmpfs(stack.backups, "2m"):
        stack.start_worker(pause="slow-checksum:2")
        assert run_cli(["backup"], stack.env, stack.root).returncode == 0
        good, _ = only_backup(stack.backups, tma_db)
        before, free_before = sha256_file(good), free_bytes(stack.backups)

        # 1. pg_dump itself runs out of space (through the workers, and in-process)
        _add_incompressible_rows(pg, tma_db, 3)
        for env, mode in ((stack.env, "workers"), (in_process, "in-process")):
            result = run_cli(["backup"], env, stack.root, timeout=120)
            assert result.returncode == 1, (mode, result.output)
            [line] = error_lines(result.stderr)
            assert "No space left on device" in line, (mode, line)
            assert "Traceback" not in result.output
            assert backups_in(stack.backups, tma_db) == [good] and sha256_file(good) == before, mode
            assert leftovers(stack.backups) == [], mode
            assert free_bytes(stack.backups) == free_before, f"{mode}: no space held by a deleted open file"
        assert stack.lock_holder() is None
        _remove_big_rows(pg, tma_db)

        # 2. the dump fits, then the file system fills up (another writer) before the .meta is written
        (stack.signals / "checksum").unlink()
        follower = stack.start_backup()
        stack.wait_for_signal("checksum")
        filler = fill(stack.backups)
        _, stderr = finished_within(follower, 60)
        assert follower.returncode == 1, stderr
        [line] = error_lines(stderr)
        assert "cannot write the backup's .meta" in line and "No space left on device" in line, line
        filler.unlink()
        assert backups_in(stack.backups, tma_db) == [good] and sha256_file(good) == before
        assert leftovers(stack.backups) == [] and not list(stack.backups.glob("*.meta.tmp"))
        assert sorted(path.name for path in stack.backups.iterdir() if not path.name.startswith(".last-set-")) \
            == [good.name, good.name + ".meta"]  # (and the good run's record for the next run)

        # 3. with room again, the next backup succeeds
        result = run_cli(["backup"], stack.env, stack.root, timeout=120)
        assert result.returncode == 0, result.output
        assert len(complete_backups(stack.backups, tma_db)) == 2


def test_a_read_only_backup_folder_fails_cleanly_and_keeps_earlier_backups(stack, tma_db):
    in_process = {**stack.env, "CELERY_BROKER_URL": ""}
    with tmpfs(stack.backups, "4m"):
        stack.start_worker()
        assert run_cli(["backup"], stack.env, stack.root).returncode == 0
        good, _ = only_backup(stack.backups, tma_db)
        before = sha256_file(good)
        listing = sorted(path.name for path in stack.backups.iterdir())
        remount(stack.backups, "ro")
        try:
            for env, code in ((stack.env, 1), (in_process, 2)):  # in-process: a settings problem, exit 2
                result = run_cli(["backup"], env, stack.root, timeout=60)
                assert result.returncode == code, result.output
                [line] = error_lines(result.stderr)
                assert "BACKUP_DIR" in line and "Read-only file system" in line, line
                assert "Traceback" not in result.output
            assert sorted(path.name for path in stack.backups.iterdir()) == listing
            assert sha256_file(good) == before
            assert stack.lock_holder() is None
            for command in (["list"], ["status"], ["verify", str(good)]):  # reading still works
                assert run_cli(command, in_process, stack.root).returncode == 0, command
        finally:
            remount(stack.backups, "rw")
        assert run_cli(["backup"], stack.env, stack.root).returncode == 0
        assert len(complete_backups(stack.backups, tma_db)) == 2


def test_a_missing_backup_folder_is_created_0700_but_never_a_missing_parent(stack, tma_db):
    absent = stack.root / "absent" / "backups"
    env = {**stack.env, "BACKUP_DIR": str(absent)}
    in_process = {**env, "CELERY_BROKER_URL": ""}
    stack.start_worker(BACKUP_DIR=str(absent))
    for run_env, code in ((env, 1), (in_process, 2)):
        result = run_cli(["backup"], run_env, stack.root, timeout=60)
        assert result.returncode == code, result.output
        [line] = error_lines(result.stderr)
        assert line.startswith("[ERROR] BACKUP_DIR:") and "No such file or directory" in line, line
        assert not (stack.root / "absent").exists(), "a typo in BACKUP_DIR never creates a tree"
    (stack.root / "absent").mkdir()
    for run_env in (env, in_process):
        result = run_cli(["backup"], run_env, stack.root, timeout=60)
        assert result.returncode == 0, result.output
        assert (absent.stat().st_mode & 0o777) == 0o700
        assert "[WARN]" not in result.stderr
        absent_backups = complete_backups(absent, tma_db)
        assert absent_backups
        for name in absent_backups:
            assert ((absent / name).stat().st_mode & 0o777) == 0o600
            assert ((absent / (name + ".meta")).stat().st_mode & 0o777) == 0o600
        shutil.rmtree(absent)
        absent.parent.mkdir(exist_ok=True)


def test_backups_are_private_from_creation_even_in_a_folder_left_open(stack, pg, admin, tma_db):
    """An existing BACKUP_DIR keeps the mode its operator gave it (0755 here: an off-site copy job may
    rely on it), with a warning; every file is 0600 from the moment it exists, the `.partial` included."""
    stack.backups.mkdir(mode=0o755)
    os.chmod(stack.backups, 0o755)
    stack.start_worker()
    with table_locked(pg, tma_db):
        follower = stack.start_backup()
        wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="pg_dump waiting on the table lock")
        [partial] = stack.backups.glob("*.dump.partial")
        assert (partial.stat().st_mode & 0o777) == 0o600, oct(partial.stat().st_mode)
    _, stderr = finished_within(follower, 60)
    assert follower.returncode == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("[WARN]")]
    assert len(warnings) == 1 and "mode 0755" in warnings[0] and "chmod 700" in warnings[0], stderr
    dump, _ = only_backup(stack.backups, tma_db)
    for path in (dump, dump.with_name(dump.name + ".meta")):
        assert (path.stat().st_mode & 0o777) == 0o600, path
    assert (stack.backups.stat().st_mode & 0o777) == 0o755, "the operator's folder mode is left as it is"
    result = run_cli(["backup"], {**stack.env, "CELERY_BROKER_URL": ""}, stack.root)
    assert result.returncode == 0 and "[WARN]  BACKUP_DIR" in result.stderr, result.output


# ---------------------------------------------------------------------------------------------------
# Two (here three) beats by mistake. The scenario waits for a minute boundary: it runs in the
# background (on a PostgreSQL and Redis of its own) from the module's first test on, and this last test
# only collects its outcome.


@pytest.fixture(scope="module", autouse=True)
def beats_in_background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BeatSlot]:
    scenario = BeatSlot(tmp_path_factory.mktemp("beats")).start()
    yield scenario
    scenario.stop()


def test_beats_running_by_mistake_still_make_one_backup_per_schedule_slot(beats_in_background):
    """Three beats with BACKUP_SCHEDULE='* * * * *' send three kickoffs for the same minute. Two arrive
    together: the database's lock refuses the second. The third beat is paused (SIGSTOP) across the
    minute and resumed only after the first backup has finished: the lock is free by then, and only the
    slot claim (SET NX in Redis) refuses it. Exactly one complete backup for the slot; two kickoffs
    skipped with a warning."""
    outcome = beats_in_background.result(timeout=200)
    [slot] = outcome["sent_at"]["a"]
    assert outcome["sent_at"] == {"a": [slot], "b": [slot], "late": [slot]}, outcome["sent_at"]
    assert outcome["late_sent_before_resumed"] == 0, "the late beat was paused before it sent its copy"
    assert outcome["skipped_before_the_late_copy"] == 1, "the second beat's copy met the lock"
    [backup] = outcome["complete"]
    assert backup.startswith(f"{outcome['database']}_{slot}"), (backup, slot)
    assert "was already started by run" in outcome["worker_log"], "the late copy was refused by the slot claim"
    assert outcome["worker_log"].count("scheduled backup skipped") == 2
    assert outcome["leftovers"] == []
