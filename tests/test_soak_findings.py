"""Defects the chaos soak found (issue 25, bench/soak.py), one regression test each, each reproduced with
the soak's own faults (real processes, a real S3 server, real PostgreSQL), without the soak's hour.
The rows in docs/reliability.md, "The chaos soak", name these tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.faults import finished_within, private_stack
from tests.s3_server import S3Server
from tests.test_repository import restic_init, s3_repository
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
