"""restic against a repository that misbehaves (issue 20), for real: a stale restic lock left by a
killed restic, and a server that goes silent (the session's SeaweedFS stopped with SIGSTOP: the kernel
still accepts its connections and takes what is sent, nothing ever answers), with the real `restic`,
the session's PostgreSQL, and real Celery workers for the runs whose locks matter.

The watchdog (worker/repository/watchdog.py) is also tried on plain processes of known behaviour: one
that only prints status lines, one that computes, one that writes a file, one behind a shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import services
from tests.conftest import base_env, run_cli
from tests.faults import children_named, finished_within
from tests.helpers import error_lines, wait_for
from tests.s3_server import S3Server
from tests.test_faults_repository import (
    PASSWORD,
    add_random_blobs,
    alive,
    assert_every_backup_sent,
    assert_local_backup_complete,
    assert_one_clean_error,
    date_a_day_earlier,
    init,
    new_repository,
    repository_lock_holder,
    slow_upload_stack,
    uploading_restic,
)
from tests.test_repository import Repository as SiteRepository
from tests.test_repository import local_repository, restic_init
from tests.test_uploads import backup, listing, make_site, set_parts, warn_lines
from worker.repository.watchdog import Watchdog

STALL_TIMEOUT = 5  # REPOSITORY_STALL_TIMEOUT, its minimum
STALLED = f"stopped answering for {STALL_TIMEOUT} s (REPOSITORY_STALL_TIMEOUT)"
# How long past REPOSITORY_STALL_TIMEOUT a stalled command may take to end: restic's key derivation,
# the socket buffers a stopped server still fills (seen: 4 s at 8 MiB/s), the watchdog's polling.
GRACE = 15


def stop(server: S3Server) -> None:
    """SIGSTOP: the server's process stands still, its listening sockets stay open."""
    assert server.process is not None and server.process.poll() is None
    os.killpg(server.process.pid, signal.SIGSTOP)


@contextmanager
def resumed_afterwards(server: S3Server) -> Iterator[None]:
    """Whatever the block does to the server, it is resumed (SIGCONT) and answering again when the
    block ends: the fixture is the session's."""
    assert server.process is not None
    try:
        yield
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
        client = server.client(timeout=2)
        wait_for(lambda: _answers(client), timeout=30, interval=0.2, what="the S3 server to answer again")


@contextmanager
def silenced(server: S3Server) -> Iterator[None]:
    """The server stopped for the block, then resumed."""
    with resumed_afterwards(server):
        stop(server)
        yield


def _answers(client: object) -> bool:
    try:
        client.list_buckets()  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# A stale restic lock under the uploads capture


def leave_stale_exclusive_lock(restic_bin: str, environment: dict[str, str]) -> int:
    """A restic killed (SIGKILL) while it held the repository's exclusive lock, as a killed `prune` or
    `check` leaves it: `restic key passwd` holds it while it waits for the new password on stdin.
    Returns the dead restic's pid, named in the lock file."""
    holder = subprocess.Popen([restic_bin, "key", "passwd"], env=environment, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: restic_locks(restic_bin, environment), timeout=30, interval=0.05,
                 what="restic's exclusive lock")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    refused = subprocess.run([restic_bin, "snapshots"], env=environment, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60)
    assert refused.returncode != 0 and "locked exclusively" in refused.stderr, "the stale lock is in the way"
    return holder.pid


def restic_locks(restic_bin: str, environment: dict[str, str]) -> list[str]:
    listed = subprocess.run([restic_bin, "--no-lock", "list", "locks"], env=environment, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.split()


@pytest.mark.slow
def test_a_stale_restic_lock_is_removed_before_the_uploads_are_captured_and_the_set_is_whole(
        pg, tma_db, restic_bin, tmp_path):
    """The capture ran restic with `check=False`, which never raised RepositoryLocked: the stale lock
    was removed only later, by the offsite link, and the night's set had no uploads part ("uploads not
    captured: … locked by another restic process"). Now the capture removes it too, and the set is whole."""
    repository = restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))
    site = make_site(pg, tma_db, tmp_path, repository, n=12)
    leave_stale_exclusive_lock(restic_bin, repository.restic_env)

    result, _, meta = backup(site)
    assert warn_lines(result.stderr) == [], result.output
    assert f"Uploads    : {len(site.uploads.sizes)} files" in result.stderr, result.output
    _, uploads_part = set_parts(restic_bin, repository, site.database, meta.timestamp)
    on_disk = {path: (site.folder / path).stat().st_size for path in site.uploads.paths}
    assert listing(restic_bin, repository, uploads_part["id"]) == on_disk
    assert meta.extra["uploads_part"] == uploads_part["short_id"]
    assert restic_locks(restic_bin, repository.restic_env) == [], "the stale lock is gone, and the run left none"


# ---------------------------------------------------------------------------------------------------
# A server that goes silent


def silent_env(s3: S3Server, pg: services.PostgresServer, tma_db: str, tmp_path: Path) -> dict[str, str]:
    """In-process runs against an initialised repository of the session's S3 server."""
    repository = new_repository(s3, tmp_path)
    init(repository)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700, exist_ok=True)
    return base_env(pg, backups, DB_NAME=tma_db, **repository.settings())


@pytest.mark.slow
@pytest.mark.parametrize("command", [["repository", "list"], ["repository", "check"]], ids=" ".join)
def test_a_command_without_progress_output_ends_with_one_line_when_the_server_goes_silent(
        command, s3, restic_bin, pg, tma_db, tmp_path):
    """`restic snapshots` and `restic check` print nothing while they wait, and a silent server sends
    no error that restic could retry: before the watchdog watched restic's own I/O they waited forever."""
    env = silent_env(s3, pg, tma_db, tmp_path)
    with silenced(s3):
        started = time.monotonic()
        try:
            result = run_cli(command, env, tmp_path, timeout=STALL_TIMEOUT + GRACE + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`tma-backup {' '.join(command)}` hung on the silent server")
        took = time.monotonic() - started
    assert result.returncode == 1, result.output
    line = assert_one_clean_error(result.output, PASSWORD, s3.secret_key)
    assert "cannot reach the repository" in line and STALLED in line, line
    assert STALL_TIMEOUT - 1 <= took <= STALL_TIMEOUT + GRACE, f"ended after {took:.1f} s"
    print(f"`tma-backup {' '.join(command)}` ended {took:.1f} s after it started against the silent server")


@pytest.mark.slow
def test_a_server_silent_during_the_upload_fails_the_run_in_bounded_time_frees_its_locks_and_the_next_run_sends_it(
        s3, restic_bin, pg, tma_db, tmp_path):
    """Through a real worker: the server stopped (SIGSTOP) while `restic backup` uploads (the uplink
    slowed to 8 MiB/s). restic writes into the socket until the buffers are full, then waits forever,
    printing its JSON status twice a second and no error; the link, meanwhile, renewed the database's
    and the repository's locks, so every later backup was refused as busy. Now restic is stopped
    REPOSITORY_STALL_TIMEOUT after it last moved a byte: one line for the operator, the locks freed,
    the backup complete locally, no restic left; with the server back, the next run sends both."""
    with slow_upload_stack(s3, restic_bin, pg, tma_db, tmp_path) as (repository, slow, stack):
        worker = stack.start_worker()
        slow.switch("slow-uplink", True)
        follower = stack.start_backup()
        try:
            with resumed_afterwards(s3):
                uploading = wait_for(lambda: uploading_restic(worker, repository), timeout=120, interval=0.05,
                                     what="restic to upload the backup")
                stop(s3)
                stopped_at = time.monotonic()
                _, stderr = finished_within(follower, STALL_TIMEOUT + GRACE + 10)
                took = time.monotonic() - stopped_at
                assert not any(alive(pid) for pid in uploading), "the stalled restic was killed"
                assert stack.lock_holder() is None, "the database's lock is free"
                assert repository_lock_holder(stack.env) is None, "the repository's lock is free"
        finally:
            follower.kill()
            slow.switch("slow-uplink", False)
        assert follower.returncode == 1, stderr
        line = assert_one_clean_error(stderr, PASSWORD, s3.secret_key)
        assert "cannot reach the repository" in line and STALLED in line, line
        assert took <= STALL_TIMEOUT + GRACE, f"ended {took:.1f} s after the server went silent"
        print(f"the run ended {took:.1f} s after the server went silent mid-upload")
        assert PASSWORD not in worker.log() and s3.secret_key not in worker.log()
        assert children_named(worker.pids(), "restic") == []
        missed = assert_local_backup_complete(stack.backups, tma_db, stack.env, tmp_path)
        assert repository.snapshots() == [], "an interrupted upload is no set"

        yesterday = date_a_day_earlier(missed)
        result = run_cli(["backup"], stack.env, tmp_path, timeout=300)
        assert result.returncode == 0, result.output + worker.log()[-3000:]
        assert f"also sent the backup of {yesterday}" in result.output, result.output
        assert_every_backup_sent(repository, stack.env, tmp_path, stack.backups, tma_db, expected=2)
        assert repository.locks() == [], "the killed restic's lock was removed"


@pytest.mark.slow
def test_a_whole_set_backup_against_a_silent_server_keeps_the_local_backup_and_the_next_one_sends_the_set(
        s3, restic_bin, pg, tma_db, tmp_path):
    """In-process, with uploads: the server silent from the start. The uploads capture and the offsite
    link each give up after REPOSITORY_STALL_TIMEOUT (the capture's failure is the run's, told once by
    the offsite link); one line, the local backup complete; resumed, the next backup sends a whole set."""
    repository = new_repository(s3, tmp_path)
    init(repository)
    site_repository = SiteRepository(repository.address, repository.settings(), repository.restic_env(), repository.bucket)
    site = make_site(pg, tma_db, tmp_path, site_repository, n=8)
    with silenced(s3):
        started = time.monotonic()
        try:
            failed = run_cli(["backup"], site.env, tmp_path, timeout=2 * (STALL_TIMEOUT + GRACE) + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the backup hung on the silent server")
        took = time.monotonic() - started
    assert failed.returncode == 1, failed.output
    line = assert_one_clean_error(failed.output, PASSWORD, s3.secret_key)
    assert "cannot reach the repository" in line and STALLED in line, line
    assert took <= 2 * (STALL_TIMEOUT + GRACE), f"failed after {took:.1f} s"
    print(f"the backup failed {took:.1f} s after it started against the silent server")
    assert_local_backup_complete(site.backup_dir, tma_db, site.env, tmp_path)

    _, _, meta = backup(site)
    _, uploads_part = set_parts(restic_bin, site_repository, site.database, meta.timestamp)
    on_disk = {path: (site.folder / path).stat().st_size for path in site.uploads.paths}
    assert listing(restic_bin, site_repository, uploads_part["id"]) == on_disk
    assert repository.locks() == []


# ---------------------------------------------------------------------------------------------------
# Slow but working: never stopped


class LimitedRestic:
    """A `restic` first on PATH that execs the machine's restic with every transfer limited
    (`--limit-upload`, `--limit-download`, KiB/s): a slow link, but a working one."""

    def __init__(self, folder: Path, restic_bin: str, kib_s: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "restic"
        script.write_text(f'#!/bin/sh\nexec {restic_bin} --limit-upload {kib_s} --limit-download {kib_s} "$@"\n')
        script.chmod(0o755)
        self.path = f"{folder}:{os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.mark.slow
def test_a_slow_upload_and_a_slow_full_read_are_never_stopped(s3, restic_bin, pg, tma_db, tmp_path):
    """REPOSITORY_STALL_TIMEOUT=5 and a link of 2 MiB/s: a 24 MB upload lasts about 12 s and
    `repository check --read-data-subset 100%` reads it all back as slowly; both finish."""
    add_random_blobs(pg, tma_db, 24)
    limited = LimitedRestic(tmp_path / "bin", restic_bin, 2048)
    env = {**silent_env(s3, pg, tma_db, tmp_path), "BACKUP_COMPRESSION": "0", "PATH": limited.path}
    started = time.monotonic()
    sent = run_cli(["backup"], env, tmp_path, timeout=180)
    took = time.monotonic() - started
    assert sent.returncode == 0, sent.output
    assert took > 2 * STALL_TIMEOUT, f"the upload took {took:.1f} s: not slow enough to prove anything"
    started = time.monotonic()
    checked = run_cli(["repository", "check", "--read-data-subset", "100%"], env, tmp_path, timeout=180)
    took = time.monotonic() - started
    assert checked.returncode == 0, checked.output
    assert took > 2 * STALL_TIMEOUT, f"the check took {took:.1f} s: not slow enough to prove anything"


@pytest.mark.slow
def test_a_server_that_pauses_for_less_than_the_timeout_is_waited_for(s3, restic_bin, pg, tma_db, tmp_path):
    """The server stopped for 2 s out of every 3 while a backup uploads (a link that stutters): restic
    never stands still for REPOSITORY_STALL_TIMEOUT, and the backup is sent. The pauses restic met add up
    to more than the timeout, so a watchdog that summed silences instead of timing each would stop it."""
    add_random_blobs(pg, tma_db, 24)
    limited = LimitedRestic(tmp_path / "bin", restic_bin, 2048)
    env = {**silent_env(s3, pg, tma_db, tmp_path), "BACKUP_COMPRESSION": "0", "PATH": limited.path}
    done = threading.Event()
    assert s3.process is not None
    group = s3.process.pid
    met: list[float] = []  # the pauses that a restic of this backup lived through

    def restic_running() -> bool:  # a restic of this backup: through the limiting wrapper, in this test's folder
        found = subprocess.run(["pgrep", "-f", "--", "--limit-upload 2048 "], capture_output=True, text=True)
        for pid in found.stdout.split():
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(str(tmp_path)):
                    return True
            except OSError:
                pass
        return False

    def stutter() -> None:
        while not done.is_set():
            before = restic_running()
            paused = time.monotonic()
            os.killpg(group, signal.SIGSTOP)
            done.wait(2)
            os.killpg(group, signal.SIGCONT)
            if before and restic_running():
                met.append(time.monotonic() - paused)
            done.wait(1)

    stutterer = threading.Thread(target=stutter, daemon=True)
    started = time.monotonic()
    with resumed_afterwards(s3):
        stutterer.start()
        try:
            result = run_cli(["backup"], env, tmp_path, timeout=300)
        finally:
            done.set()
            stutterer.join()
    took = time.monotonic() - started
    assert result.returncode == 0, result.output
    assert sum(met) > STALL_TIMEOUT, (f"restic met {len(met)} pauses ({sum(met):.1f} s) in a backup of "
                                      f"{took:.1f} s: too few to prove anything")
    assert error_lines(result.output) == []


# ---------------------------------------------------------------------------------------------------
# The watchdog on plain processes


def watched(code: str, timeout: float, *, shell: bool = False, limit: float = 20) -> tuple[bool, float]:
    """Run a Python snippet (behind `sh -c`, not exec'd, when `shell`) under a Watchdog, reading its
    stdout as Restic does; returns whether the watchdog stopped it, and after how long."""
    argv = ["sh", "-c", '"$0" -c "$1"; true', sys.executable, code] if shell else [sys.executable, "-c", code]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    watchdog = Watchdog(process, timeout)
    started = time.monotonic()
    ender = threading.Timer(limit, lambda: os.killpg(process.pid, signal.SIGKILL))
    ender.start()
    try:
        with watchdog:
            assert process.stdout is not None
            for line in process.stdout:
                watchdog.piped(len(line))
            process.wait()
    finally:
        ender.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    return watchdog.stalled, time.monotonic() - started


STATUS_LINES = ("import sys, time\nfor n in range(200):\n"
                "    print('{\"message_type\":\"status\",\"bytes_done\":123,\"n\":%d}' % n, flush=True)\n"
                "    time.sleep(0.1)\n")


def test_status_lines_alone_are_no_progress():
    """restic's JSON status lines, read by us, do not count: it stopped moving data."""
    stalled, took = watched(STATUS_LINES, timeout=1)
    assert stalled and 1 <= took < 3, took


def test_a_process_that_does_nothing_is_stopped():
    stalled, took = watched("import time; time.sleep(60)", timeout=1)
    assert stalled and 1 <= took < 3, took


def test_computing_without_io_is_progress():
    """restic comparing a large unchanged tree with its parent (lstat and CPU, no reads or writes)."""
    stalled, took = watched("import time\nend = time.monotonic() + 3.5\nwhile time.monotonic() < end: pass\n",
                            timeout=1)
    assert not stalled and took >= 3.5, took


def test_writing_a_file_slowly_is_progress(tmp_path):
    """A slow link: 32 KiB every 0.4 s (restic's socket writes count like a file's)."""
    target = tmp_path / "written"
    code = (f"import os, time\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
            "for _ in range(8):\n    os.write(fd, os.urandom(32768)); time.sleep(0.4)\n")
    stalled, took = watched(code, timeout=1)
    assert not stalled and took >= 3, took


def test_the_processes_behind_a_shell_count(tmp_path):
    """restic behind a wrapper that does not exec it: the wrapper's child moves the data."""
    target = tmp_path / "written"
    code = (f"import os, time\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
            "for _ in range(8):\n    os.write(fd, os.urandom(32768)); time.sleep(0.4)\n")
    stalled, took = watched(code, timeout=1, shell=True)
    assert not stalled and took >= 3, took
    stalled, took = watched(STATUS_LINES, timeout=1, shell=True)
    assert stalled and took < 3, took
