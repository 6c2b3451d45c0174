"""Faults of a restore with uploads (issue 12): the uploads disk full while the set's files are fetched,
and the process killed (SIGKILL, `TMA_BACKUP_CRASH_AT`) at each step of the swap of the database and
the uploads together. After each: the database and UPLOAD_DIR are both the old ones or both the new ones,
never a mix (the exact file set of one side, and the database content of the same side), the live files
kept, never deleted; and `tma-backup repair`, a rerun or a rollback settles what the crash left.
Real PostgreSQL, restic, a local-path repository, tmpfs for the small disk. See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests import tma_cloud
from tests.conftest import run_cli
from tests.faults import remount, tmpfs
from tests.helpers import accepts_connections, error_lines, settings_for, wait_until_free
from tests.test_restore import digests, managed_databases
from tests.test_uploads import (  # noqa: F401  (fixtures)
    Site,
    _no_kept_copies_left,
    backup,
    change_site,
    make_site,
    ours,
    repo,
    site,
)

JOURNAL = ".tma-uploads-swap.json"


def prepared(pg: Any, site: Site) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A backup (side A: its database and files), then TMA Cloud goes on (side B). Returns the dump and
    both sides: {"database": digests, "files": digests}."""
    _, dump, _ = backup(site)
    side_a = {"database": digests(pg, site.database), "files": tma_cloud.folder_digests(site.folder)}
    change_site(pg, site)
    side_b = {"database": digests(pg, site.database), "files": tma_cloud.folder_digests(site.folder)}
    assert side_a["database"] != side_b["database"] and side_a["files"] != side_b["files"]
    return dump, side_a, side_b


def assert_side(pg: Any, site: Site, side: dict[str, Any], name: str) -> None:
    """The live database and the live files are exactly `side`."""
    assert accepts_connections(pg, site.database), "the live database accepts connections"
    files = tma_cloud.folder_digests(site.folder)
    assert files == side["files"], f"UPLOAD_DIR is not exactly side {name}: {sorted(set(files) ^ set(side['files']))}"
    assert digests(pg, site.database) == side["database"], f"the database is not side {name}"


def assert_nothing_pending(site: Site) -> None:
    assert not any(name.startswith(".tma-restore-") or name == JOURNAL for name in ours(site.folder)), ours(site.folder)


def kept_files(site: Site, folder_name: str) -> dict[str, str]:
    return tma_cloud.folder_digests(site.folder / folder_name)


# ---------------------------------------------------------------------------------------------------
# The uploads disk full


def test_an_uploads_disk_without_room_for_the_set_is_refused_before_anything_is_touched(
        pg, admin, tma_db, repo, tmp_path):
    with tmpfs(tmp_path / "uploads", "24m"):
        site = make_site(pg, tma_db, tmp_path, repo, n=30)
        dump, _, side_b = prepared(pg, site)
        result = run_cli(["restore", str(dump), "--with-uploads", "--confirm", tma_db], site.env, site.cwd)
        assert result.returncode == 1, result.output
        [line] = error_lines(result.stderr)
        assert "not enough free space in UPLOAD_DIR" in line and "nothing was touched" in line, line
        assert "Traceback" not in result.output
        assert_side(pg, site, side_b, "B")
        assert ours(site.folder) == []
        assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "previous", tma_db) == []


def test_the_uploads_disk_filling_up_while_the_set_is_fetched_swaps_nothing_and_leaves_no_staging(
        pg, admin, tma_db, repo, tmp_path):
    with tmpfs(tmp_path / "uploads", "128m") as folder:
        site = make_site(pg, tma_db, tmp_path, repo, n=40)
        dump, _, side_b = prepared(pg, site)
        # Room in bytes (the check before the fetch passes), but the disk is full after ten more files:
        # its inodes run out, the same ENOSPC a full disk gives.
        stats = os.statvfs(folder)
        remount(folder, f"nr_inodes={stats.f_files - stats.f_ffree + 10}")
        result = run_cli(["restore", str(dump), "--with-uploads", "--confirm", tma_db], site.env, site.cwd)
        remount(folder, "nr_inodes=100000")
        assert result.returncode == 1, result.output
        assert "Traceback" not in result.output
        assert_side(pg, site, side_b, "B")
        assert ours(site.folder) == [], "no staging folder, no journal left"
        assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "previous", tma_db) == []
        lines = error_lines(result.stderr)
        assert len(lines) == 1, result.output
        assert "no space left on device" in lines[0].lower(), lines[0]


# ---------------------------------------------------------------------------------------------------
# Killed during the swap


def crash_restore(site: Site, dump: Path, point: str) -> None:
    result = run_cli(["restore", str(dump), "--with-uploads", "--confirm", site.database],
                     {**site.env, "TMA_BACKUP_CRASH_AT": point}, site.cwd)
    assert result.returncode == -signal.SIGKILL, result.output
    assert (site.folder / JOURNAL).exists(), "the crash left the uploads swap's journal"
    wait_until_free(settings_for(site.env), site.database)


def recover(site: Site, how: str, dump: Path) -> Any:
    if how == "repair":
        result = run_cli(["repair", "--database", site.database], site.env, site.cwd)
    elif how == "rollback":
        result = run_cli(["rollback", "--confirm", site.database], site.env, site.cwd)
    else:  # the same restore again
        result = run_cli(["restore", str(dump), "--with-uploads", "--confirm", site.database], site.env, site.cwd)
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("point, how", [
    ("uploads:after-database-swap", "repair"),
    ("uploads:half-moved-out", "repair"),
    ("uploads:half-moved-out", "rerun"),
])
def test_killed_after_the_database_swap_both_end_new(pg, admin, site, point, how):
    dump, side_a, side_b = prepared(pg, site)
    crash_restore(site, dump, point)
    assert digests(pg, site.database) == side_a["database"], "the database swap had committed"
    journal = json.loads((site.folder / JOURNAL).read_text())
    assert journal["phase"] == ("db" if point == "uploads:after-database-swap" else "out")

    result = recover(site, how, dump)
    assert_side(pg, site, side_a, "A (new)")
    assert_nothing_pending(site)
    aside = [name for name in ours(site.folder) if name.startswith(".tma-previous-")]
    assert any(kept_files(site, name) == side_b["files"] for name in aside), "the live files, all kept together"
    if how == "rerun":
        assert "an interrupted swap was settled first" in result.stderr, result.output
    else:  # the operator is told what was done to the uploads
        assert "finished the uploads swap" in result.output, result.output


@pytest.mark.parametrize("point", ["swap:connections-refused"])
def test_killed_before_the_database_swap_both_stay_old(pg, admin, site, point):
    dump, _, side_b = prepared(pg, site)
    crash_restore(site, dump, point)
    assert any(name.startswith(".tma-restore-") for name in ours(site.folder)), "the set's files were staged"
    assert tma_cloud.folder_digests(site.folder) == side_b["files"], "the live files were not touched"

    repaired = recover(site, "repair", dump)
    assert_side(pg, site, side_b, "B (old)")
    assert ours(site.folder) == [], "the staging folder and the journal are gone, nothing else was moved"
    assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "previous", site.database) == []
    assert "left the uploads as they were" in repaired.output, repaired.output  # the operator is told


def test_a_rollback_right_after_a_crash_mid_swap_brings_both_old_back(pg, admin, site):
    """Issue 12: "the worker killed during the uploads swap (both old or both new, never a mix; a rerun
    or a rollback repairs it)": a rollback as the first thing after the crash."""
    dump, side_a, side_b = prepared(pg, site)
    crash_restore(site, dump, "uploads:half-moved-out")
    recover(site, "rollback", dump)
    assert_side(pg, site, side_b, "B (old)")
    assert_nothing_pending(site)
    assert any(kept_files(site, name) == side_a["files"] for name in ours(site.folder)), "the set's files, kept"


def test_killed_after_the_database_swap_on_a_fresh_machine_repair_finishes_the_files_too(pg, admin, site):
    """No database of that name before the restore (a fresh server): the swap is a rename and keeps no
    copy, so the journal alone tells that it committed."""
    dump, side_a, _ = prepared(pg, site)
    tma_cloud.drop_database(admin, site.database)
    crash_restore(site, dump, "uploads:after-database-swap")
    assert digests(pg, site.database) == side_a["database"], "the database swap had committed"
    recover(site, "repair", dump)
    assert_side(pg, site, side_a, "A (new)")
    assert_nothing_pending(site)
