"""Retention never deletes what it does not own; verify catches every kind of damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import backups_in, error_lines, only_backup, sha256_file


@pytest.mark.slow
def test_retention_keeps_exactly_the_newest_and_never_foreign_files(cli_env, backup_dir, tma_db, tmp_path):
    foreign = {
        "aaa_manual.dump": b"hand-made",
        "other_db_20200101T000000Z.dump": b"another database's backup",
        "other_db_20200101T000000Z.dump.meta": b"timestamp=20200101T000000Z\n",
        f"{tma_db}_20000101T000000Z.dump": b"a dump without .meta: not provably ours",
        f"{tma_db}.dump": b"no timestamp",
        f"{tma_db}_20000101T000000Z.dump.bak": b"not our suffix",
    }
    for name, content in foreign.items():
        (backup_dir / name).write_bytes(content)
    (backup_dir / f"{tma_db}_20010101T000000Z.dump").mkdir()  # a folder named like a dump
    leftover = backup_dir / f"{tma_db}_20010101T000001Z.dump.partial"
    leftover.write_bytes(b"crashed run")

    env = {**cli_env, "BACKUP_RETAIN_COUNT": "3"}
    made = []
    for _ in range(5):
        result = run_cli(["backup"], env, tmp_path)
        assert result.returncode == 0, result.output
        made.append(result.stderr.split("File       : ", 1)[1].split("\n", 1)[0].strip())

    complete = [p for p in backups_in(backup_dir, tma_db) if p.with_name(p.name + ".meta").exists()]
    assert [p.name for p in complete] == [Path(m).name for m in made[-3:]]
    for name, content in foreign.items():
        assert (backup_dir / name).read_bytes() == content, f"{name} must survive pruning"
    assert (backup_dir / f"{tma_db}_20010101T000000Z.dump").is_dir()
    assert not leftover.exists(), "a crashed run's .partial is removed"


def test_retain_count_of_one_keeps_the_new_backup(cli_env, backup_dir, tma_db, tmp_path):
    env = {**cli_env, "BACKUP_RETAIN_COUNT": "1"}
    for _ in range(2):
        assert run_cli(["backup"], env, tmp_path).returncode == 0
    dump, meta = only_backup(backup_dir, tma_db)
    assert meta.sha256 == sha256_file(dump)


def test_verify_passes_on_a_good_backup(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, meta = only_backup(backup_dir, tma_db)
    result = run_cli(["verify", str(dump)], cli_env, tmp_path)
    assert result.returncode == 0, result.output
    assert meta.sha256 in result.stderr and "Backup is intact." in result.stderr


def _damaged_copy(dump: Path, name: str) -> Path:
    copy = dump.with_name(name + dump.name)
    shutil.copy(dump, copy)
    shutil.copy(dump.with_name(dump.name + ".meta"), copy.with_name(copy.name + ".meta"))
    return copy


def test_verify_fails_on_every_kind_of_damage(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, meta = only_backup(backup_dir, tma_db)

    flipped = _damaged_copy(dump, "flipped-")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    result = run_cli(["verify", str(flipped)], cli_env, tmp_path)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"expected {meta.sha256}" in line and f"actual {sha256_file(flipped)}" in line

    truncated = _damaged_copy(dump, "truncated-")
    truncated.write_bytes(truncated.read_bytes()[:100])
    result = run_cli(["verify", str(truncated)], cli_env, tmp_path)
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1
    assert "SHA-256 mismatch" in result.stderr

    result = run_cli(["verify", str(backup_dir / "missing.dump")], cli_env, tmp_path)
    assert result.returncode == 1 and "no such backup file" in error_lines(result.stderr)[0]

    no_meta = _damaged_copy(dump, "nometa-")
    no_meta.with_name(no_meta.name + ".meta").unlink()
    result = run_cli(["verify", str(no_meta)], cli_env, tmp_path)
    assert result.returncode == 1
    assert ".meta is missing" in error_lines(result.stderr)[0]

    for result_text in (result.output,):
        assert "Traceback" not in result_text


def test_verify_rejects_a_file_that_is_not_a_dump_even_with_a_matching_meta(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, meta = only_backup(backup_dir, tma_db)
    fake = backup_dir / "fake.dump"
    fake.write_bytes(b"this is not a pg_dump archive\n" * 10)
    text = dump.with_name(dump.name + ".meta").read_text().replace(meta.sha256, sha256_file(fake))
    (backup_dir / "fake.dump.meta").write_text(text)
    result = run_cli(["verify", str(fake)], cli_env, tmp_path)
    assert result.returncode == 1
    assert "not a readable dump" in error_lines(result.stderr)[0]


def test_list_shows_complete_and_incomplete_backups(cli_env, backup_dir, tma_db, tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    (backup_dir / f"{tma_db}_20000101T000000Z.dump").write_bytes(b"x")
    result = run_cli(["list"], cli_env, tmp_path)
    assert result.returncode == 0, result.output
    rows = [line for line in result.stdout.splitlines() if tma_db in line]
    assert len(rows) == 2
    assert "INCOMPLETE (no .meta)" in rows[0] and "complete" in rows[1] and "INCOMPLETE" not in rows[1]


def test_status_reports_age_and_fails_when_backups_are_stale(cli_env, backup_dir, tma_db, tmp_path):
    result = run_cli(["status"], cli_env, tmp_path)
    assert result.returncode == 1 and "no complete backup" in error_lines(result.stderr)[0]
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    result = run_cli(["status"], cli_env, tmp_path)
    assert result.returncode == 0 and "Backups are current." in result.stderr
    dump, _ = only_backup(backup_dir, tma_db)
    old = f"{tma_db}_20000101T000000Z.dump"
    meta_text = dump.with_name(dump.name + ".meta").read_text().replace(dump.name[len(tma_db) + 1:-5], "20000101T000000Z")
    dump.rename(backup_dir / old)
    dump.with_name(dump.name + ".meta").unlink()
    (backup_dir / (old + ".meta")).write_text(meta_text)
    result = run_cli(["status"], cli_env, tmp_path)
    assert result.returncode == 1 and "over the limit" in error_lines(result.stderr)[0]
