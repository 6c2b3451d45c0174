"""The `s3` fixture is a real S3 server: restic (run as tma-backup will run it, every secret in the
environment and none on the command line) initialises a repository in it, backs up into it and lists the
snapshots; a wrong secret is refused; a crash of the server loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.s3_server import S3Server

RESTIC_PASSWORD = "restic-Pw-For-Tests-4b7e"


def restic(restic_bin: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([restic_bin, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def restic_env(s3: S3Server, repository: str, cache: Path, **overrides: str) -> dict[str, str]:
    """Nothing inherited but PATH: the repository, its password and the S3 identity, all in the environment."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cache), "RESTIC_CACHE_DIR": str(cache),
            "RESTIC_REPOSITORY": repository, "RESTIC_PASSWORD": RESTIC_PASSWORD, **s3.aws_env(), **overrides}


@pytest.fixture(scope="module")
def repo(s3: S3Server, restic_bin: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One restic repository in a fresh bucket (`restic init` creates the bucket); its environment."""
    bucket = f"tma-test-{uuid.uuid4().hex[:8]}"
    env = restic_env(s3, s3.url(bucket, "db/main"), tmp_path_factory.mktemp("restic-cache"))
    result = restic(restic_bin, env, "init")
    assert result.returncode == 0, result.stderr
    return {**env, "TEST_BUCKET": bucket}


def backup(restic_bin: str, env: dict[str, str], source: Path, content: str) -> str:
    source.mkdir()
    (source / "dump.sql").write_text(content)
    result = restic(restic_bin, env, "backup", "--json", str(source))
    assert result.returncode == 0, result.stderr
    summary = [json.loads(line) for line in result.stdout.splitlines() if '"summary"' in line][-1]
    return str(summary["snapshot_id"])[:8]  # restic 0.14 prints the short id here


def snapshot_short_ids(restic_bin: str, env: dict[str, str]) -> set[str]:
    result = restic(restic_bin, env, "snapshots", "--json")
    assert result.returncode == 0, result.stderr
    return {snapshot["short_id"] for snapshot in json.loads(result.stdout)}


def test_restic_backs_up_into_the_s3_server_with_secrets_only_in_the_environment(
        s3: S3Server, restic_bin: str, repo: dict[str, str], tmp_path: Path) -> None:
    snapshot = backup(restic_bin, repo, tmp_path / "src", "CREATE TABLE t (id int);\n")
    assert snapshot in snapshot_short_ids(restic_bin, repo)
    # The repository is really in the bucket, under its prefix, as S3 objects.
    listing = s3.client().list_objects_v2(Bucket=repo["TEST_BUCKET"], Prefix="db/main/")
    keys = {item["Key"] for item in listing.get("Contents", [])}
    assert "db/main/config" in keys
    assert any(key.startswith("db/main/snapshots/") for key in keys)
    assert any(key.startswith("db/main/data/") for key in keys)


def test_a_wrong_secret_key_is_refused(s3: S3Server, restic_bin: str, repo: dict[str, str],
                                       tmp_path: Path) -> None:
    wrong = {**repo, "AWS_SECRET_ACCESS_KEY": s3.secret_key + "x"}
    listed = restic(restic_bin, wrong, "snapshots", "--json")
    assert listed.returncode != 0
    assert "signature" in listed.stderr.lower()
    # Nor can it create anything: the bucket it names stays absent.
    bucket = f"tma-test-{uuid.uuid4().hex[:8]}"
    created = restic(restic_bin, {**wrong, "RESTIC_REPOSITORY": s3.url(bucket)}, "init")
    assert created.returncode != 0
    assert bucket not in {entry["Name"] for entry in s3.client().list_buckets()["Buckets"]}


def test_a_killed_server_started_again_still_has_the_repository(s3: S3Server, restic_bin: str,
                                                                repo: dict[str, str], tmp_path: Path) -> None:
    snapshot = backup(restic_bin, repo, tmp_path / "src", "before the outage\n")
    s3.kill()
    try:
        down = restic(restic_bin, repo, "snapshots", "--json")
        assert down.returncode != 0
        assert "connection refused" in down.stderr
    finally:
        s3.start()
    assert snapshot in snapshot_short_ids(restic_bin, repo)
    check = restic(restic_bin, repo, "check")
    assert check.returncode == 0, check.stderr
