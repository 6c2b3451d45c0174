"""The zstd-stream fast mode: `.dump.zst` backups that verify, restore, drill and prune like any other."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest
import zstandard

from tests import tma_cloud
from tests.conftest import run_cli
from tests.faults import free_bytes, tmpfs
from tests.helpers import error_lines, leftovers, restore_copy, sha256_file, toc_entries
from tests.test_restore import change_live, digests, managed_databases
from worker.archive import streams
from worker.archive.meta import read_meta


def zst_backups(directory: Path, database: str) -> list[Path]:
    pattern = re.compile(re.escape(database) + r"_\d{8}T\d{6}Z\.dump\.zst")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


@pytest.mark.slow
def test_zstd_stream_backup_is_exact_verified_and_restorable(pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    env = {**cli_env, "BACKUP_COMPRESSION": "zstd-stream"}
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    [dump] = zst_backups(backup_dir, tma_db)
    meta = read_meta(dump.with_name(dump.name + ".meta"))
    assert dump.with_name(dump.name + ".meta").read_text().splitlines()[5] == "compression=zstd-stream:1"
    assert meta.sha256 == sha256_file(dump)
    plain = tmp_path / "plain.dump"
    with open(dump, "rb") as source, open(plain, "wb") as target:
        zstandard.ZstdDecompressor().copy_stream(source, target)
    assert meta.toc_entries == toc_entries(plain), "the .zst holds a plain custom-format archive"
    assert meta.extra["archive_bytes"] == str(plain.stat().st_size), "the room a restore needs is recorded"
    with pg.connect(tma_db) as connection:
        assert meta.row_counts == tma_cloud.exact_counts(connection)
    restore_copy(pg, admin, plain, f"{tma_db}_plain")
    tma_cloud.drop_database(admin, f"{tma_db}_plain")

    assert run_cli(["verify", str(dump)], env, tmp_path).returncode == 0
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged = dump.with_name(dump.name.replace(tma_db + "_", tma_db + "_damaged_"))
    damaged.write_bytes(bytes(data))
    damaged.with_name(damaged.name + ".meta").write_text(dump.with_name(dump.name + ".meta").read_text())
    result = run_cli(["verify", str(damaged)], env, tmp_path)
    assert result.returncode == 1 and "SHA-256 mismatch" in error_lines(result.stderr)[0]

    at_backup = digests(pg, tma_db)
    change_live(pg, tma_db)
    result = run_cli(["restore", str(dump), "--confirm", tma_db], env, tmp_path)
    assert result.returncode == 0, result.output
    assert digests(pg, tma_db) == at_backup
    assert not [p for p in backup_dir.iterdir() if ".restore-" in p.name], "the decompressed copy is removed"
    assert run_cli(["drill"], env, tmp_path).returncode == 0
    for name in managed_databases(admin, "previous"):
        tma_cloud.drop_database(admin, name)


@pytest.mark.slow
def test_retention_counts_zst_and_plain_backups_together(cli_env, backup_dir, tma_db, tmp_path):
    for compression in ("6", "zstd-stream:3", "6", "zstd-stream"):
        env = {**cli_env, "BACKUP_COMPRESSION": compression, "BACKUP_RETAIN_COUNT": "2"}
        assert run_cli(["backup"], env, tmp_path).returncode == 0
    kept = sorted(p.name for p in backup_dir.iterdir() if not p.name.endswith(".meta") and not p.name.startswith("."))
    assert len(kept) == 2
    assert kept[0].endswith(".dump") and kept[1].endswith(".dump.zst")


def test_lz4_and_native_zstd_are_refused_up_front_by_pg_dump_15(cli_env, backup_dir, tma_db, tmp_path):
    result = run_cli(["backup"], {**cli_env, "BACKUP_COMPRESSION": "zstd:3"}, tmp_path)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "needs pg_dump 16" in line and "zstd-stream" in line
    assert [p for p in backup_dir.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize("mode", ["swap", "in-place"])
def test_a_zst_restore_without_room_to_decompress_is_refused_before_anything_is_touched(
        mode, pg, admin, cli_env, backup_dir, tma_db, tmp_path):
    """The decompressed copy goes beside the `.dump.zst`. On a folder that holds the backup but not that
    copy, the restore refuses up front: in-place mode must not drop the database and then find the disk
    full."""
    env = {**cli_env, "BACKUP_COMPRESSION": "zstd-stream"}
    assert run_cli(["backup"], env, tmp_path).returncode == 0
    [dump] = zst_backups(backup_dir, tma_db)
    meta_file = dump.with_name(dump.name + ".meta")
    room_kib = (dump.stat().st_size + meta_file.stat().st_size) // 1024 + 256
    with tmpfs(tmp_path / "small", f"{room_kib}k") as small:
        shutil.copy(dump, small / dump.name)
        shutil.copy(meta_file, small / meta_file.name)
        before = digests(pg, tma_db)
        change_live(pg, tma_db)
        changed = digests(pg, tma_db)
        assert changed != before
        small_env = {**env, "BACKUP_DIR": str(small)}
        result = run_cli(["restore", str(small / dump.name), "--confirm", tma_db, "--mode", mode], small_env, tmp_path)
        assert result.returncode == 1, result.output
        [line] = error_lines(result.stderr)
        assert "not enough free space" in line and dump.name in line and "Traceback" not in result.output, line
        assert digests(pg, tma_db) == changed, "the live database is untouched"
        assert managed_databases(admin, "scratch") == [] and managed_databases(admin, "previous", tma_db) == []
        assert sorted(p.name for p in small.iterdir()) == sorted([dump.name, meta_file.name])


def _common_tail(first: bytes, second: bytes) -> int:
    """Bytes the two streams share at their ends, before zstd's 4-byte frame checksum (which covers
    the whole input, so it always differs)."""
    first, second = first[:-4], second[:-4]
    shared = 0
    while shared < min(len(first), len(second)) and first[-1 - shared] == second[-1 - shared]:
        shared += 1
    return shared


def test_zstd_stream_is_rsyncable_an_unchanged_stretch_compresses_to_the_same_bytes(tmp_path):
    """`--rsyncable`: after a change, the compressed stream falls back into step with the previous
    night's, so the off-site repository stores the unchanged rest once. A single zstd stream (as
    python-zstandard writes it) differs from the change to the very end."""
    rng = random.Random(11)
    rows = b"".join(f"{n}\t{rng.randrange(10**9)}\tuser{rng.randrange(5000)}@example.com\t"
                    f"/home/{rng.randrange(10**6):x}/f.bin\n".encode() for n in range(400_000))
    cut = len(rows) // 5
    nights = {"first": rows, "second": rows[:cut] + b"42\tone row added in the middle\n" + rows[cut:]}
    written = {}
    for name, data in nights.items():
        target = streams.open_output(tmp_path / f"{name}.dump.zst", 1)
        for start in range(0, len(data), streams.CHUNK):
            target.write(data[start:start + streams.CHUNK])
        target.close()
        written[name] = (tmp_path / f"{name}.dump.zst").read_bytes()
        with streams.open_archive(tmp_path / f"{name}.dump.zst") as archive:
            assert archive.read() == data
        assert os.stat(tmp_path / f"{name}.dump.zst").st_mode & 0o777 == 0o600
    shared = _common_tail(written["first"], written["second"])
    assert shared > 0.6 * len(written["first"]), f"only {shared} of {len(written['first'])} bytes in step"


def test_zstd_stream_without_the_zstd_tool_fails_with_one_error_line(cli_env, backup_dir, tma_db, tmp_path):
    """A worker image or host without zstd: refused before pg_dump starts, nothing left that looks good."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            if entry.name != "zstd" and not (tools / entry.name).exists():
                (tools / entry.name).symlink_to(entry.path)
    env = {**cli_env, "BACKUP_COMPRESSION": "zstd-stream", "PATH": str(tools)}
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 1, result.output
    [line] = error_lines(result.stderr)
    assert "zstd tool" in line and "apt-get install zstd" in line and "Traceback" not in result.output
    assert [p for p in backup_dir.iterdir() if not p.name.startswith(".")] == []


def test_a_zstd_stream_dump_into_a_full_folder_fails_with_one_line_and_leaves_nothing(
        pg, cli_env, tma_db, tmp_path):
    """The zstd tool, not this process, writes the file: its full disk must still come out as one
    [ERROR] line naming it, with the partial file gone (and its space free) and the earlier backup
    untouched."""
    with tmpfs(tmp_path / "small", "2m") as small:
        env = {**cli_env, "BACKUP_COMPRESSION": "zstd-stream", "BACKUP_DIR": str(small)}
        assert run_cli(["backup"], env, tmp_path).returncode == 0
        [good] = zst_backups(small, tma_db)
        before, free_before = sha256_file(good), free_bytes(small)
        with pg.connect(tma_db, autocommit=True) as connection:  # 3 MiB that no codec can shrink
            connection.execute(
                "INSERT INTO files (owner_id, path, mime, content) SELECT 1, '/big', 'application/octet-stream',"
                " (SELECT string_agg(gen_random_bytes(1024), ''::bytea) FROM generate_series(1, 3072))")
        result = run_cli(["backup"], env, tmp_path, timeout=120)
        assert result.returncode == 1, result.output
        [line] = error_lines(result.stderr)
        assert "No space left on device" in line and "Traceback" not in result.output, line
        assert zst_backups(small, tma_db) == [good] and sha256_file(good) == before
        assert leftovers(small) == [] and free_bytes(small) == free_before
