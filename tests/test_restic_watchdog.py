"""restic against a repository that misbehaves (issue 20), for real: a stale restic lock left by a
killed restic, with the real `restic` and the session's PostgreSQL.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.helpers import wait_for
from tests.test_repository import local_repository, restic_init
from tests.test_uploads import backup, listing, make_site, set_parts, warn_lines

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
