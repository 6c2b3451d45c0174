"""The test session's `restic` (tests/cheap_kdf.py) changes nothing but the cost of opening a repository it
initialised: the same restic answers every command with the same output and exit code, the repository
keeps one key, a wrong password is still refused, and a local or S3 repository it made is cheap to open."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.s3_server import S3Server

PASSWORD = "cheap-kdf-Pw-For-Tests-1c9d"


def run(restic: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([restic, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)


def local_env(repository: Path, **overrides: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(repository.parent), "RESTIC_CACHE_DIR": str(repository.parent / "cache"),
            "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD": PASSWORD, **overrides}


def the_session_restic() -> str:
    found = shutil.which("restic")
    assert found is not None and "tma-test-restic-" in found, (
        f"the test session's restic must come first on PATH: {found} (TMA_TEST_FULL_KDF=1 turns it off)")
    return found


@pytest.mark.skipif(os.environ.get("TMA_TEST_FULL_KDF") == "1", reason="the suite runs with restic's own keys")
def test_a_local_repository_the_session_initialises_keeps_its_master_key_under_cheap_parameters(
        restic_bin: str, tmp_path: Path) -> None:
    restic = the_session_restic()
    repository = tmp_path / "repo"
    env = local_env(repository)
    created = run(restic, env, "init")
    assert created.returncode == 0 and "created restic repository" in created.stdout, created.stderr
    [key] = (repository / "keys").iterdir()
    params = json.loads(key.read_text())
    assert (params["N"], params["r"], params["p"]) == (1024, 8, 1)
    assert oct(key.stat().st_mode & 0o777) == oct(0o400), "the mode restic gives its own key files"

    source = tmp_path / "source"
    source.mkdir()
    (source / "data").write_text("kept\n")
    assert run(restic, env, "backup", "-q", str(source)).returncode == 0
    assert run(restic, env, "check").returncode == 0
    restored = run(restic, env, "dump", "latest", str(source / "data"))
    assert restored.returncode == 0 and restored.stdout == "kept\n", restored.stderr

    refused = run(restic, {**env, "RESTIC_PASSWORD": "wrong"}, "snapshots")
    assert refused.returncode == 1 and "wrong password" in refused.stderr
    again = run(restic, env, "init")  # restic's own refusal and exit code, the key left alone
    assert again.returncode == 1 and "already" in again.stderr, again.stderr
    assert list((repository / "keys").iterdir()) == [key]


@pytest.mark.skipif(os.environ.get("TMA_TEST_FULL_KDF") == "1", reason="the suite runs with restic's own keys")
def test_an_s3_repository_the_session_initialises_opens_with_cheap_parameters(
        s3: S3Server, restic_bin: str, tmp_path: Path) -> None:
    restic = the_session_restic()
    bucket = f"tma-kdf-{uuid.uuid4().hex[:8]}"
    env = local_env(tmp_path / "unused", RESTIC_REPOSITORY=s3.url(bucket, "db/main"), **s3.aws_env())
    assert run(restic, env, "init").returncode == 0
    [key] = s3.client().list_objects_v2(Bucket=bucket, Prefix="db/main/keys/")["Contents"]
    body = s3.client().get_object(Bucket=bucket, Key=key["Key"])["Body"].read()
    assert json.loads(body)["N"] == 1024
    listed = run(restic, env, "snapshots", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
