"""A local BACKUP_REPOSITORY given relative to the working folder (`repo`, `./repo`, `local:repo`): the
settings make it absolute once, so every restic the tool runs finds it, wherever it runs (the uploads
capture runs restic inside UPLOAD_DIR). Every other backend's address is left exactly as given.

Against the session's PostgreSQL and restic, a real UPLOAD_DIR and a local-path repository; the set is
read back with the plain `restic` CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tma_cloud
from tests.test_repository import local_repository, restic_init, snapshots
from tests.test_uploads import backup, dumped, listing, make_site, set_parts
from worker.settings import Settings


@pytest.mark.parametrize("given", ["repository", "./repository", "local:repository"])
def test_a_whole_set_backup_to_a_repository_named_relative_to_the_working_folder(
        pg, tma_db, restic_bin, tmp_path, given):
    repository = restic_init(restic_bin, local_repository(tmp_path / "repository", tmp_path / "restic-cache"))
    site = make_site(pg, tma_db, tmp_path, repository, n=12)
    site.env["BACKUP_REPOSITORY"] = given  # the CLI runs in tmp_path (site.cwd), where ./repository is
    assert site.cwd == tmp_path and site.folder != tmp_path

    result, dump, meta = backup(site)
    shown = f"local:{tmp_path / 'repository'}" if given.startswith("local:") else str(tmp_path / "repository")
    assert f"in {shown}" in result.stderr, result.output  # the address as restic used it: absolute

    # Plain restic reads the whole set: the database part and the uploads part, every byte.
    database_part, uploads_part = set_parts(restic_bin, repository, tma_db, meta.timestamp)
    on_disk = {path: (site.folder / path).stat().st_size for path in site.uploads.paths}
    assert listing(restic_bin, repository, uploads_part["id"]) == on_disk
    for path in site.uploads.paths[:3]:
        assert dumped(restic_bin, repository, uploads_part["id"], path) == (site.folder / path).read_bytes()
    assert dumped(restic_bin, repository, database_part["id"], dump.name) == dump.read_bytes()
    assert meta.extra["uploads_missing"] == "0" and meta.extra["uploads_files"] == str(len(on_disk))
    # Nothing was created relative to another folder (a second repository beside the uploads, say).
    assert not (site.folder / "repository").exists() and len(snapshots(restic_bin, repository)) == 2
    assert tma_cloud.folder_digests(site.folder), "the uploads are still there"


REMOTE = ["s3:https://s3.example.com/bucket/prefix", "s3:http://127.0.0.1:9000/bucket", "sftp:user@host:/srv/restic",
          "sftp:host:relative/path", "rest:https://user:secret@host:8000/repo", "b2:bucket:path", "azure:container:/",
          "gs:bucket:/path", "swift:container:/path", "rclone:remote:path/to/repo"]


def _resolved(address: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.chdir(cwd)
    settings = Settings(_env_file=None, BACKUP_REPOSITORY=address,  # type: ignore[call-arg]
                        BACKUP_REPOSITORY_PASSWORD="x", BACKUP_REPOSITORY_ACCESS_KEY_ID="k",
                        BACKUP_REPOSITORY_SECRET_ACCESS_KEY="s")
    return settings.repository


def test_a_local_repository_path_is_made_absolute_once_and_other_backends_are_left_alone(tmp_path, monkeypatch):
    home = os.path.expanduser("~")
    cases = {
        "repo": f"{tmp_path}/repo",
        "./repo": f"{tmp_path}/repo",
        "repo/": f"{tmp_path}/repo",
        "sub/repo": f"{tmp_path}/sub/repo",
        "../repo": f"{tmp_path}/../repo",
        "~/repo": f"{home}/repo",
        "/srv/repo": "/srv/repo",
        "  /srv/repo  ": "/srv/repo",
        "local:repo": f"local:{tmp_path}/repo",
        "local:./repo": f"local:{tmp_path}/repo",
        "local:/srv/repo": "local:/srv/repo",
        # restic reads an address without a known backend prefix as a local path: so do we
        "backups:2024": f"{tmp_path}/backups:2024",
    }
    for given, expected in cases.items():
        assert _resolved(given, tmp_path, monkeypatch) == expected, given
    for address in REMOTE:
        assert _resolved(address, tmp_path, monkeypatch) == address, address
    # Resolved once: the settings say the same whatever folder the process is in afterwards.
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None, BACKUP_REPOSITORY="repo", BACKUP_REPOSITORY_PASSWORD="x")  # type: ignore[call-arg]
    monkeypatch.chdir("/")
    assert settings.repository == f"{tmp_path}/repo"


def test_a_local_repository_that_names_no_folder_is_refused(tmp_path, monkeypatch):
    from worker.settings import SettingsError, get_settings

    monkeypatch.chdir(tmp_path)
    for address in ("local:", "local:   "):
        monkeypatch.setenv("BACKUP_REPOSITORY", address)
        monkeypatch.setenv("BACKUP_REPOSITORY_PASSWORD", "x")
        get_settings.cache_clear()
        try:
            with pytest.raises(SettingsError) as raised:
                get_settings()
        finally:
            get_settings.cache_clear()
        assert str(raised.value).startswith("BACKUP_REPOSITORY: must name a folder"), raised.value
