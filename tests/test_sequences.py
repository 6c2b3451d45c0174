"""The whole set under the sequences operators really run on one machine (issue 20): the same command
twice, a backup after a restore, a restore after a restore, repair after a failure, a disk of its own
with `lost+found`. Each test here failed on the code before issue 20; the stateful model test that
drives random sequences is tests/test_model.py.

Real services throughout: the session's PostgreSQL, restic with a local repository, the CLI in-process.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests import services, tma_cloud
from tests.conftest import run_cli
from tests.helpers import error_lines, wait_for
from tests.test_repository import snapshots, tag_value
from tests.test_restore import digests
from tests.test_uploads import (
    KEY_SHA256,
    Site,
    _no_kept_copies_left,  # noqa: F401  (autouse: kept copies dropped after each test)
    add_upload,
    backup,
    bind_mount,
    delete_row,
    dumped,
    listing,
    ours,
    repo,  # noqa: F401
    set_parts,
    site,  # noqa: F401
    write_env_file,
)
from worker.archive import catalogue
from worker.archive.meta import read_meta
from worker.uploads import swap as uploads_swap

ROTATED_KEY = "Tma-Rotated-File-Key-For-Tests-0b9e42d1"


def restore_with_uploads(site: Site, *extra: str) -> Any:
    return run_cli(["restore", "--from-repository", "latest", "--with-uploads", "--confirm", site.database, *extra],
                   site.env, site.cwd)


def live_files(site: Site) -> dict[str, str]:
    return tma_cloud.folder_digests(site.folder)


def churn(pg: Any, site: Site) -> None:
    """What TMA Cloud does between two backups, again and again: two uploads deleted (blob and row),
    three added."""
    present = sorted(name for name in os.listdir(site.folder) if uploads_swap.is_tmas(name))
    for path in present[:2]:
        (site.folder / path).unlink()
        delete_row(pg, site.database, path)
    for _ in range(3):
        add_upload(pg, site)


def test_a_backup_after_a_restore_with_uploads_takes_only_tma_files(site, restic_bin):
    before = live_files(site)
    backup(site)
    restored = restore_with_uploads(site)
    assert restored.returncode == 0, restored.output
    assert any(name.startswith(uploads_swap.PREVIOUS_PREFIX) for name in ours(site.folder)), "the live files kept aside"

    _, _, second = backup(site)
    _, uploads_part = set_parts(restic_bin, site.repository, site.database, second.timestamp)
    assert sorted(listing(restic_bin, site.repository, uploads_part["id"])) == sorted(before), \
        "the tool's own folders never enter a set"
    assert second.extra["uploads_files"] == str(len(before))
    assert second.extra["uploads_unreferenced"] == "0"


def test_the_second_restore_with_uploads_works_and_leaves_exactly_the_sets_files(pg, site, restic_bin):
    backup(site)
    assert restore_with_uploads(site).returncode == 0
    churn(pg, site)
    _, _, second = backup(site)
    expected = live_files(site)
    churn(pg, site)  # what the second restore must undo

    again = restore_with_uploads(site)
    assert again.returncode == 0, again.output
    assert error_lines(again.stderr) == []
    assert live_files(site) == expected, "UPLOAD_DIR holds exactly the second set's uploads"
    with pg.connect(site.database) as connection:
        paths = {row[0] for row in connection.execute("SELECT path FROM files WHERE path IS NOT NULL")}
    assert paths <= set(expected)
    assert not (site.folder / uploads_swap.JOURNAL).exists()
    assert not [name for name in ours(site.folder) if name.startswith(uploads_swap.STAGED_PREFIX)]

    repaired = run_cli(["repair", "--database", site.database], site.env, site.cwd)
    assert repaired.returncode == 0, repaired.output


def test_kept_previous_files_go_when_their_database_copy_goes(pg, admin, site):
    backup(site)
    assert restore_with_uploads(site).returncode == 0
    first_aside = [name for name in ours(site.folder) if name.startswith(uploads_swap.PREVIOUS_PREFIX)]
    assert len(first_aside) == 1
    churn(pg, site)
    backup(site)
    assert restore_with_uploads(site).returncode == 0  # RESTORE_KEEP_PREVIOUS=1: the first kept copy is dropped
    aside = [name for name in ours(site.folder) if name.startswith(uploads_swap.PREVIOUS_PREFIX)]
    assert first_aside[0] not in aside, "the files of a dropped database copy are gone with it"
    kept = {row[0] for row in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                            (f"{site.database}__pre_%",))}
    assert [name.removeprefix(uploads_swap.PREVIOUS_PREFIX) for name in aside] == sorted(kept)


def test_a_lost_and_found_on_the_uploads_disk_is_never_captured_moved_or_replaced(pg, site, restic_bin, tmp_path):
    """UPLOAD_DIR on a disk of its own: its `lost+found` belongs to the file system (here a mount point,
    which no rename can move, as a root-owned folder cannot be moved by the worker's user)."""
    with bind_mount(tmp_path / "fs-own", site.folder / "lost+found") as lost:
        (lost / "#1234").write_bytes(b"fsck's find")
        before = live_files(site)
        _, _, meta = backup(site)
        _, uploads_part = set_parts(restic_bin, site.repository, site.database, meta.timestamp)
        assert not [path for path in listing(restic_bin, site.repository, uploads_part["id"]) if "lost+found" in path]
        churn(pg, site)
        restored = restore_with_uploads(site)
        assert restored.returncode == 0, restored.output
        assert (lost / "#1234").read_bytes() == b"fsck's find"
        assert live_files(site) == before
        assert run_cli(["repair"], site.env, site.cwd).returncode == 0


def test_a_live_entry_that_cannot_be_moved_stays_in_place_and_the_swap_still_completes(tmp_path):
    """The swap itself, on real folders: an entry whose rename fails (a mount point) is left where it
    is, its staged namesake is not forced over it, and everything else is swapped; running the same
    journal again (what repair does after a crash) changes nothing more."""
    folder, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(b"old a")
    (folder / "b.pdf").write_bytes(b"old b")
    staged = uploads_swap.staged_folder(folder, "run-1")
    staged.mkdir()
    (staged / "a.pdf").write_bytes(b"new a")
    (staged / "c.pdf").write_bytes(b"new c")
    (staged / "pinned").mkdir()
    (staged / "pinned" / "x").write_bytes(b"staged x")
    (staged / ".tma-previous-old").mkdir()  # what an older version captured: never moved in
    (staged / ".tma-previous-old" / "y.pdf").write_bytes(b"y")
    with bind_mount(elsewhere, folder / "pinned") as pinned:
        (pinned / "x").write_bytes(b"live x")
        journal = uploads_swap.Journal("run-1", "db", staged.name, ".tma-previous-run-1", "out")
        journal.save(folder)
        left = uploads_swap.finish(folder, journal)
        assert left == ["pinned"]
        assert (pinned / "x").read_bytes() == b"live x"
        assert sorted(os.listdir(folder)) == [".tma-previous-run-1", "a.pdf", "c.pdf", "pinned"]
        assert (folder / "a.pdf").read_bytes() == b"new a"
        assert sorted(os.listdir(folder / ".tma-previous-run-1")) == ["a.pdf", "b.pdf"]
        assert uploads_swap.read_journal(folder) is None
        uploads_swap.finish(folder, journal)  # again, as a repair would after a crash: nothing changes
        assert sorted(os.listdir(folder)) == [".tma-previous-run-1", "a.pdf", "c.pdf", "pinned"]


def test_repair_goes_on_to_the_other_databases_when_one_fails(pg, admin, site):
    """A pending uploads swap that cannot be settled (its staging folder is a file: an OSError) fails
    that database's repair with one line, never the repair of the databases after it."""
    other = tma_cloud.create_populated(pg, f"zz_other_{os.getpid()}")
    try:
        for name in (site.database, other):  # both left refusing connections by an interrupted swap
            admin.execute(f"ALTER DATABASE \"{name}\" SET tma_backup.swap_in_progress = 'run-x'")
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        blocker = site.folder / ".tma-restore-blocked"
        blocker.write_text("not a folder")
        uploads_swap.Journal("run-y", site.database, blocker.name, ".tma-previous-run-y", "in").save(site.folder)

        result = run_cli(["repair"], site.env, site.cwd)
        assert result.returncode == 1, result.output
        assert "Traceback" not in result.output
        [line] = error_lines(result.stderr)
        assert site.database in line, line
        allowed = admin.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (other,)).fetchone()
        assert allowed == (True,), f"the database after the failing one was repaired too: {result.output}"
    finally:
        (site.folder / uploads_swap.JOURNAL).unlink(missing_ok=True)
        admin.execute(f'ALTER DATABASE "{site.database}" WITH ALLOW_CONNECTIONS true')
        tma_cloud.drop_database(admin, other)


def test_a_backup_of_another_database_takes_no_uploads_and_no_env(pg, site, restic_bin, admin):
    """Uploads and `.env` belong to DB_NAME (TMA Cloud's database): `backup --database other` on the
    same settings makes a database-only set, even where the other database has a `files` table."""
    other = tma_cloud.create_populated(pg, f"tma_second_{os.getpid()}")
    try:
        result = run_cli(["backup", "--database", other], site.env, site.cwd)
        assert result.returncode == 0, result.output
        found = [item for item in snapshots(restic_bin, site.repository) if f"db:{other}" in item.get("tags", [])]
        assert len(found) == 1 and "part:database" in found[0]["tags"], [item["tags"] for item in found]
        names = [name for name in os.listdir(site.backup_dir) if name.startswith(other + "_")]
        assert sorted(Path(path).name for path in found[0]["paths"]) == sorted(names), "the dump and its .meta only"
        assert "Uploads" not in result.stderr, result.output
    finally:
        tma_cloud.drop_database(admin, other)


def a_day_earlier(dump: Path) -> Path:
    """The backup `dump` (with its .meta and kept .env) as if it had been made a day earlier."""
    meta = read_meta(catalogue.meta_path(dump))
    earlier = catalogue.utc_timestamp(catalogue.parse_timestamp(meta.timestamp) - timedelta(days=1))
    moved = dump.with_name(catalogue.backup_name(meta.database, earlier))
    text = catalogue.meta_path(dump).read_text().replace(f"timestamp={meta.timestamp}", f"timestamp={earlier}", 1)
    catalogue.meta_path(moved).write_text(text)
    catalogue.meta_path(dump).unlink()
    catalogue.env_path(dump).rename(catalogue.env_path(moved))
    dump.rename(moved)
    return moved


def test_a_set_sent_after_an_outage_carries_the_env_of_its_own_backup_time(site, restic_bin, tmp_path):
    """The repository is away for one night; the key is rotated the next day. The set of the night of
    the outage, sent by the next run, holds the `.env` of its night (the old key), matching its .meta."""
    away = {**site.env, "BACKUP_REPOSITORY": str(tmp_path / "repository-away")}
    failed = run_cli(["backup"], away, site.cwd)
    assert failed.returncode == 1, failed.output
    [made] = sorted(site.backup_dir.glob(f"{site.database}_*.dump"))
    night_of_outage = a_day_earlier(made)  # yesterday's: today's retention keeps one set a day
    old_env = site.env_file.read_bytes()
    assert catalogue.env_path(night_of_outage).read_bytes() == old_env
    assert catalogue.env_path(night_of_outage).stat().st_mode & 0o777 == 0o600

    write_env_file(site.env_file, site.folder, key=ROTATED_KEY)
    _, newest, _ = backup(site)
    sets = {tag_value(item, "at:"): item for item in snapshots(restic_bin, site.repository)
            if tag_value(item, "part:") == "database"}
    outage_meta = read_meta(catalogue.meta_path(night_of_outage))
    older = sets[outage_meta.timestamp]
    env_name = night_of_outage.name.removesuffix(".dump") + ".env"
    assert dumped(restic_bin, site.repository, older["id"], env_name) == old_env, "the .env of its own night"
    assert outage_meta.extra["file_encryption_key_sha256"] == KEY_SHA256
    newer = sets[read_meta(catalogue.meta_path(newest)).timestamp]
    assert ROTATED_KEY.encode() in dumped(restic_bin, site.repository, newer["id"], newest.name.removesuffix(".dump") + ".env")


def test_the_kept_env_goes_with_its_backup_when_retention_removes_it(site):
    site.env["BACKUP_RETAIN_COUNT"] = "1"
    backup(site)
    backup(site)
    dumps = sorted(site.backup_dir.glob(f"{site.database}_*.dump"))
    envs = sorted(site.backup_dir.glob(f"{site.database}_*.dump.env"))
    assert len(dumps) == 1 and envs == [catalogue.env_path(dumps[0])]


def test_a_backup_during_a_fetch_of_the_same_database_leaves_the_fetch_alone(site, tmp_path):
    """A drill from the repository is checking its download when a local backup of the same database
    (settings without the repository: it need not wait for the fetch's repository lock) runs and prunes
    crashed runs' leftovers: the download is not among them, and the drill passes."""
    backup(site)
    marker = tmp_path / "fetch-paused"
    paused = {**site.env, "TMA_BACKUP_PAUSE_AT": f"fetch:publish|8|{marker}"}
    drill = subprocess.Popen([services.TMA_BACKUP, "drill", "--from-repository", "latest"], env=paused,
                             cwd=site.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, timeout=60, what="the fetch to reach its publication")
        local = run_cli(["backup"], {**site.env, "BACKUP_REPOSITORY": ""}, site.cwd)
        assert local.returncode == 0, local.output  # its prune ran while the drill's download waited
        out, err = drill.communicate(timeout=120)
    finally:
        drill.kill()
    assert drill.returncode == 0, out + err
    assert "[ERROR]" not in err
    assert not [name for name in os.listdir(site.backup_dir) if name.startswith(".fetch-")]


def test_a_restore_after_a_rollback_keeps_the_state_it_replaced_for_the_next_rollback(pg, site):
    """restore → rollback → live edits → restore: the copy kept for a rollback is the state the last
    restore replaced (the live edits), not an older one that happens to be a newer database (kept copies
    were ordered by when their database was created, and RESTORE_KEEP_PREVIOUS=1 dropped the newest)."""
    backup(site)
    backed_up = live_state(pg, site)
    churn(pg, site)
    assert restore_with_uploads(site).returncode == 0
    assert run_cli(["rollback", "--confirm", site.database], site.env, site.cwd).returncode == 0
    churn(pg, site)
    edited = live_state(pg, site)  # the state the next restore replaces
    assert edited != backed_up
    assert restore_with_uploads(site).returncode == 0
    assert live_state(pg, site) == backed_up
    rolled = run_cli(["rollback", "--confirm", site.database], site.env, site.cwd)
    assert rolled.returncode == 0, rolled.output
    assert live_state(pg, site) == edited, "the rollback brings back what the restore replaced"


def live_state(pg: Any, site: Site) -> tuple[dict[str, str], dict[str, str]]:
    return digests(pg, site.database), live_files(site)
