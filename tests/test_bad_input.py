"""Bad input on the backup side: property-based tests (hypothesis) over `.meta` parsing, CLI arguments,
file names in BACKUP_DIR and settings values, and hostile entries in a real BACKUP_DIR backed up by a
real worker. Every input gives a correct result or one error line with exit 1 or 2; never a traceback;
never a change on disk. See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import string
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests import services, tma_cloud
from tests.conftest import base_env, run_cli
from tests.faults import Stack, private_stack
from tests.helpers import error_lines, only_backup
from worker.archive import catalogue
from worker.archive.meta import SEED_KEYS, BackupMeta, MetaError, parse_meta, read_meta, table_key
from worker.cli.main import cli
from worker.settings import SettingsError, get_settings

# Text that an environment variable, a command-line argument or a file name can hold: no NUL, no lone
# surrogates; everything else (newlines, \x85, \u2028, right-to-left marks, emoji) is fair game.
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
SETTINGS_PREFIXES = ("DB_", "BACKUP_", "CELERY_", "RESTORE_", "WORKER_", "FOLLOW_", "PG_LOCK_")
OTHER_COMMANDS = {"restore", "rollback", "drill"}  # the restore side's commands: not exercised here


def fast(examples: int = 100) -> hypothesis_settings:
    """No per-example deadline (real subprocesses and file systems are not uniformly fast); fixtures
    are per test, and each example cleans up after itself."""
    return hypothesis_settings(max_examples=examples, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with every tma-backup setting removed, then `values` set; restored afterwards."""
    saved = dict(os.environ)
    try:
        for key in [key for key in os.environ if key.startswith(SETTINGS_PREFIXES)]:
            del os.environ[key]
        os.environ.update(values)
        get_settings.cache_clear()
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


def snapshot(directory: Path) -> dict[str, tuple[Any, ...]]:
    """Everything in a folder tree as it is on disk: kind and mode, size, mtime, link target, content
    digest. (A folder's own size and mtime are left out: a scratch file made and removed inside it, such
    as the write test of BACKUP_DIR, changes them and nothing else.)"""
    found: dict[str, tuple[Any, ...]] = {}
    for root, folders, files in os.walk(directory):
        for name in folders + files:
            path = Path(root, name)
            info = os.lstat(path)
            if path.is_dir() and not path.is_symlink():
                found[str(path.relative_to(directory))] = (info.st_mode,)
                continue
            target = os.readlink(path) if path.is_symlink() else None
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
            found[str(path.relative_to(directory))] = (info.st_mode, info.st_size, info.st_mtime_ns, target, digest)
    return found


def invoke(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    """Run the CLI in this process (click's runner) with exactly this environment, from `cwd`."""
    with environment(env):
        previous = Path.cwd()
        os.chdir(cwd)
        try:
            return CliRunner().invoke(cli, args, catch_exceptions=True)
        finally:
            os.chdir(previous)


def assert_clean_outcome(result: Any, args: list[str]) -> None:
    """Exit 0, 1 or 2; no exception but SystemExit; at most one error line, exactly one on failure."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError(f"{args!r} raised {result.exception!r}:\n"
                             + "".join(traceback.format_exception(*result.exc_info)))
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith(("[ERROR]", "Error:"))]
    if result.exit_code == 2 and not errors:  # no command at all: click shows the usage, exit 2
        assert result.output.startswith("Usage:"), (args, result.output)
        return
    assert len(errors) == (1 if result.exit_code else 0), (args, result.output)


# ---------------------------------------------------------------------------------------------------
# .meta parsing

SHA256 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
NAMES = st.text(alphabet=TEXT, min_size=1, max_size=24)
OUR_KEYS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12).filter(
    lambda key: key not in SEED_KEYS and key not in {"file_size_bytes", "duration_seconds_exact"})
METAS = st.builds(
    BackupMeta,
    timestamp=st.text(alphabet=TEXT, max_size=20),
    database=NAMES,
    user=st.text(alphabet=TEXT, max_size=20),
    mode=st.sampled_from(["host", "docker"]),
    compression=st.sampled_from(["0", "6", "9", "gzip:3", "zstd:5", "lz4", "none"]),
    toc_entries=st.integers(0, 10**9),
    file_size_bytes=st.integers(0, 10**15),
    duration_seconds=st.floats(0, 10**7, allow_nan=False, allow_infinity=False),
    sha256=SHA256,
    row_counts=st.dictionaries(st.builds(table_key, NAMES, NAMES), st.integers(0, 10**15), max_size=6),
    extra=st.dictionaries(OUR_KEYS, st.text(alphabet=TEXT, max_size=30), max_size=4),
)


@fast()
@given(METAS)
@example(BackupMeta(timestamp="t", database="db\x85name\u2028x", user="u", mode="host", compression="6",
                    toc_entries=1, file_size_bytes=1, duration_seconds=0.0, sha256="0" * 64))
def test_meta_render_and_parse_round_trip_for_any_names(meta):
    parsed = parse_meta(meta.render())
    assert parsed.database == meta.database and parsed.timestamp == meta.timestamp and parsed.user == meta.user
    assert parsed.toc_entries == meta.toc_entries and parsed.file_size_bytes == meta.file_size_bytes
    assert parsed.sha256 == meta.sha256 and parsed.compression == meta.compression
    assert parsed.row_counts == meta.row_counts
    assert abs(parsed.duration_seconds - meta.duration_seconds) <= 0.0005 + 1e-9 * meta.duration_seconds
    assert {key: value for key, value in parsed.extra.items() if key in meta.extra} == meta.extra


META_LINES = st.one_of(
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from([*SEED_KEYS, "file_size_bytes",
                                                                     "duration_seconds_exact", "x"]),
              st.one_of(st.text(alphabet=TEXT, max_size=12), SHA256,
                        st.sampled_from(["1", "-1", "²", "١٢", "nan", "inf", "1e400", " 7 ", ""]))),
    st.just("# Table row counts at backup time"),
    st.builds(lambda key, value: f"{key}={value}", st.text(alphabet=TEXT, max_size=10),
              st.sampled_from(["0", "12", "²", "-3", "x", ""])),
    st.text(alphabet=TEXT, max_size=30),
)


@fast()
@given(st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
                 st.lists(META_LINES, max_size=16).map("\n".join)))
@example("timestamp=a\ndatabase=b\ntoc_entries=1\nsha256=" + "0" * 64 + "\n# Table row counts at backup time\nt=²\n")
@example("timestamp=a\ndatabase=b\ntoc_entries=1\nduration_seconds=nan\nsha256=" + "0" * 64)
def test_meta_garbage_raises_meta_error_and_nothing_else(text):
    try:
        meta = parse_meta(text)
    except MetaError:
        return
    again = parse_meta(meta.render())  # whatever parses also renders, and reads back the same
    assert (again.database, again.timestamp, again.sha256, again.row_counts) == \
           (meta.database, meta.timestamp, meta.sha256, meta.row_counts)


@fast()
@given(st.binary(max_size=300))
def test_meta_files_of_any_bytes_raise_meta_error_and_nothing_else(tmp_path, content):
    path = tmp_path / "x.dump.meta"
    path.write_bytes(content)
    try:
        read_meta(path)
    except MetaError:
        pass


def test_a_meta_that_is_a_fifo_a_folder_or_a_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.meta"
    os.mkfifo(fifo)
    (tmp_path / "folder.meta").mkdir()
    for path in (fifo, tmp_path / "folder.meta", Path("/dev/zero")):
        started = time.monotonic()
        with pytest.raises(MetaError):
            read_meta(path)
        assert time.monotonic() - started < 1, path


# ---------------------------------------------------------------------------------------------------
# Settings values


VARIABLES = ["DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "DB_CONTAINER", "DB_MODE",
             "BACKUP_RETAIN_COUNT", "BACKUP_DIR", "BACKUP_COMPRESSION", "BACKUP_SCHEDULE", "BACKUP_MAX_AGE_HOURS",
             "BACKUP_LOCK_TIMEOUT", "BACKUP_RETRIES", "PG_LOCK_WAIT_TIMEOUT", "CELERY_BROKER_URL",
             "CELERY_RESULT_BACKEND", "WORKER_HOST", "FOLLOW_TIMEOUT"]
VALUES = st.one_of(
    st.text(alphabet=TEXT, max_size=30),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["", " ", "0", "-1", "1e3", "nan", "inf", "~", "~nosuchuser_tma/x", "~/b", "..", "../x",
                     "* * * * *", "61 * * * *", "0 2 * * * *", "gzip:12", "zstd", "lz4:3", "none", "10s",
                     "auto", "docker", "host", "a/b", "x" * 64, "redis://", "true"]),
)


@fast()
@given(st.sampled_from(VARIABLES), VALUES)
@example("BACKUP_DIR", "~nosuchuser_tma/backups")
@example("DB_NAME", "x" * 64)
def test_every_setting_value_is_accepted_or_refused_in_one_line_naming_it(tmp_path, variable, value):
    before = snapshot(tmp_path)
    with environment({variable: value}):
        previous = Path.cwd()
        os.chdir(tmp_path)
        try:
            settings = get_settings()
            _ = settings.backup_dir  # what every command computes first
        except SettingsError as error:
            message = str(error)
            assert message.startswith(f"{variable}:") and "\n" not in message, message
            if variable == "DB_PASSWORD":
                assert value not in message or len(value) < 4
        finally:
            os.chdir(previous)
    assert snapshot(tmp_path) == before


@fast(40)
@given(st.sampled_from(VARIABLES), VALUES, st.sampled_from([["list"], ["status"]]))
def test_a_command_under_any_setting_value_is_a_result_or_one_line(tmp_path, variable, value, command):
    folder = tmp_path / "backups"
    folder.mkdir(exist_ok=True)
    env = {"BACKUP_DIR": str(folder), variable: value}
    before = snapshot(tmp_path)
    result = invoke(command, env, tmp_path)
    assert_clean_outcome(result, [f"{variable}={value!r}", *command])
    if result.exit_code == 2:
        assert error_lines(result.stderr)[0].startswith(f"[ERROR] {variable}:"), result.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# CLI arguments


@dataclass
class Sample:
    database: str
    folder: Path
    dump: Path


@pytest.fixture(scope="module")
def sample(pg: services.PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sample]:
    """One real, complete backup of a small TMA-shaped database, made once for this module."""
    name = f"tma_bad_{uuid.uuid4().hex[:8]}"
    with pg.connect(autocommit=True) as admin:
        tma_cloud.create_database(admin, name)
    with pg.connect(name, autocommit=True) as connection:
        tma_cloud.create_schema(connection)
        tma_cloud.populate(connection, users=5)
    root = tmp_path_factory.mktemp("sample")
    folder = root / "backups"
    result = run_cli(["backup"], base_env(pg, folder, DB_NAME=name), root)
    assert result.returncode == 0, result.output
    dump, _ = only_backup(folder, name)
    yield Sample(name, folder, dump)
    with pg.connect(autocommit=True) as admin:
        tma_cloud.drop_database(admin, name)


TOKENS = st.one_of(
    st.sampled_from(["--database", "-d", "--help", "-h", "--bogus", "--", "-", ".", "..", "../x", "a/b", "/",
                     "x" * 64, "x" * 300, "[/x]", "evil\nname", "*.dump", "backups", "list"]),
    st.text(alphabet=TEXT, max_size=30),
)
ARGUMENTS = st.builds(lambda command, rest: ([command] if command else []) + rest,
                      st.sampled_from(["backup", "list", "status", "verify", "--help", "bogus", ""]),
                      st.lists(TOKENS, max_size=4))


@fast(150)
@given(ARGUMENTS)
@example(["backup", "--database", "../escape"])
@example(["backup", "--database", "x" * 300])
@example(["verify", "x" * 300])
@example(["status", "-d", ".."])
def test_any_command_line_gives_a_result_or_one_error_line_and_changes_nothing(pg, sample, tmp_path, args):
    assume(not (args and args[0] in OTHER_COMMANDS))
    assume(sample.database not in args and "postgres" not in args and not any(a.startswith("template") for a in args))
    folder = tmp_path / "backups"
    if not folder.exists():
        shutil.copytree(sample.folder, folder)
    # DB_NAME names no database: a `backup` that the arguments leave pointed at DB_NAME fails to connect
    env = base_env(pg, folder, DB_NAME="tma_no_such_database")
    env = {key: value for key, value in env.items() if key.startswith(SETTINGS_PREFIXES)}
    before = snapshot(tmp_path)
    result = invoke(args, env, tmp_path)
    assert_clean_outcome(result, args)
    assert snapshot(tmp_path) == before, args


@pytest.mark.parametrize("args, code, expected", [
    (["backup", "--database", "../escape"], 2, "--database: must be a non-empty database name without '/'"),
    (["backup", "--database", "x" * 300], 2, "--database: must be at most 63 bytes"),
    (["status", "-d", ".."], 2, "--database: must be a non-empty database name"),
    (["verify", "x" * 300], 1, "File name too long"),
    (["backup", "--bogus"], 2, "No such option '--bogus'"),
    (["nonsense"], 2, "No such command 'nonsense'"),
])
def test_the_real_entry_point_answers_bad_arguments_in_one_line(cli_env, backup_dir, tmp_path, args, code, expected):
    before = snapshot(backup_dir)
    result = run_cli(args, cli_env, tmp_path, timeout=60)
    assert result.returncode == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("[ERROR]", "Error:"))]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(backup_dir) == before


# ---------------------------------------------------------------------------------------------------
# File names in BACKUP_DIR


def _own_patterns(database: str) -> list[re.Pattern[str]]:
    """This tool's own file names for a database, written out here rather than taken from the code
    under test: a backup (`.dump`, or `.dump.zst` in the zstd-stream mode), its `.meta`, a crashed
    run's scratch files, a crashed restore's hidden decompressed copy."""
    stamp = re.escape(database) + r"_\d{8}T\d{6}Z\.dump(?:\.zst)?"
    return [re.compile(stamp + r"(?:\.meta|\.partial|\.partial\.counts|\.meta\.tmp)?\Z", re.DOTALL),
            re.compile(r"\." + stamp + r"\.restore-[0-9a-f]{8}\.dump\Z", re.DOTALL)]


def file_names(database: str) -> st.SearchStrategy[str]:
    stamp = st.datetimes().map(lambda moment: moment.strftime("%Y%m%dT%H%M%SZ"))
    suffix = st.sampled_from([".dump", ".dump.meta", ".dump.partial", ".dump.partial.counts", ".dump.meta.tmp",
                              ".dump.bak", ".dump ", ".dump\n", ".meta"])
    ours = st.builds(lambda moment, end: f"{database}_{moment}{end}", stamp, suffix)
    decorated = st.builds(lambda before, name, after: before + name + after,
                          st.sampled_from(["", " ", "\n", "..", ".", "evil\n", "[bold]", "other_", "\u202e"]),
                          ours, st.sampled_from(["", "\n", " ", ".."]))
    anything = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                       min_size=1, max_size=40)
    return st.one_of(ours, decorated, anything).filter(
        lambda name: name not in {".", ".."} and len(name.encode()) <= 255)


KINDS = ("file", "folder", "link-out", "fifo")


@fast(60)
@given(st.data())
def test_any_file_names_are_listed_or_skipped_and_only_own_files_are_ever_pruned(sample, data):
    names = data.draw(st.lists(file_names(sample.database), min_size=1, max_size=8, unique=True))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder, outside = root / "backups", root / "outside"
        folder.mkdir(mode=0o700)
        outside.mkdir()
        secret = outside / "secret"
        secret.write_bytes(b"not yours")
        shutil.copy2(sample.dump, folder / sample.dump.name)
        shutil.copy2(sample.dump.with_name(sample.dump.name + ".meta"), folder / (sample.dump.name + ".meta"))
        hostile: dict[str, str] = {}
        for index, name in enumerate(names):
            path = folder / name
            if os.path.lexists(path):
                continue
            kind = KINDS[index % len(KINDS)]
            if kind == "file":
                path.write_bytes(b"hand-made " + name.encode())
            elif kind == "folder":
                path.mkdir()
            elif kind == "link-out":
                path.symlink_to(secret)
            else:
                os.mkfifo(path)
            hostile[name] = kind
        before = snapshot(root)

        entries = catalogue.list_all_backups(folder)
        assert all(entry.path.parent == folder and entry.path.is_file() and not entry.path.is_symlink()
                   for entry in entries)
        assert sample.dump.name in {entry.path.name for entry in entries if entry.complete}
        doomed = catalogue.plan_prune(folder, sample.database, retain=1)
        own = _own_patterns(sample.database)
        for path in doomed:
            assert path.parent == folder and not path.is_symlink() and path.is_file(), path
            assert any(pattern.match(path.name) for pattern in own), path
            assert hostile.get(path.name) in (None, "file"), path
        assert folder / sample.dump.name not in doomed

        result = invoke(["list"], {"BACKUP_DIR": str(folder), "DB_NAME": sample.database}, root)
        assert_clean_outcome(result, ["list"])
        assert result.exit_code == 0
        assert all(line.isprintable() for line in result.stdout.splitlines()), result.stdout
        assert snapshot(root) == before, "listing changes nothing"

        catalogue.delete_files(doomed)
        assert secret.read_bytes() == b"not yours"
        for name in hostile:
            if folder / name not in doomed:
                assert os.path.lexists(folder / name), name


# ---------------------------------------------------------------------------------------------------
# Hostile entries in a real BACKUP_DIR, through a real worker


@pytest.fixture
def stack(pg: services.PostgresServer, tma_db: str, tmp_path: Path) -> Iterator[Stack]:
    with private_stack(pg, tma_db, tmp_path) as created:
        yield created


@pytest.mark.slow
def test_hostile_entries_in_the_backup_folder_are_skipped_never_followed_and_never_pruned(stack, tma_db):
    stack.start_worker(BACKUP_RETAIN_COUNT="1")
    folder, outside = stack.backups, stack.root / "outside"
    assert run_cli(["backup"], stack.env, stack.root).returncode == 0
    first, first_meta = only_backup(folder, tma_db)
    meta_text = first.with_name(first.name + ".meta").read_text()

    outside.mkdir()
    real_elsewhere = outside / f"{tma_db}_20200101T000000Z.dump"  # a complete backup, outside the folder
    shutil.copy(first, real_elsewhere)
    (outside / (real_elsewhere.name + ".meta")).write_text(
        meta_text.replace(first.name[len(tma_db) + 1:-5], "20200101T000000Z"))
    secret = outside / "secret.txt"
    secret.write_text("not a backup")

    def ours(stamp: str, suffix: str = ".dump") -> Path:
        return folder / f"{tma_db}_{stamp}{suffix}"

    ours("20200101T000000Z").symlink_to(real_elsewhere)  # a symlink named like a dump, to a complete backup
    ours("20200101T000000Z", ".dump.meta").symlink_to(outside / (real_elsewhere.name + ".meta"))
    ours("20200102T000000Z").mkdir()  # a folder named like a dump, with a parseable .meta beside it
    ours("20200102T000000Z", ".dump.meta").write_text(meta_text.replace(first.name[len(tma_db) + 1:-5],
                                                                        "20200102T000000Z"))
    ours("20200103T000000Z", ".dump.partial").symlink_to(secret)  # a leftover's name, but a link out
    ours("20200104T000000Z", ".dump.partial").mkdir()
    ours("20200105T000000Z").write_bytes(b"hand-made")  # a dump whose .meta is a FIFO
    os.mkfifo(ours("20200105T000000Z", ".dump.meta"))
    ours("20200106T000000Z").write_bytes(b"hand-made")  # a dump whose .meta is a link out
    ours("20200106T000000Z", ".dump.meta").symlink_to(secret)
    (folder / "my backup.dump").write_bytes(b"space")
    (folder / f"evil\n{tma_db}_20990101T000000Z.dump").write_bytes(b"a newline that would fake a row")
    (folder / f"[bold]{tma_db}_20200107T000000Z.dump").write_bytes(b"Rich markup")
    (folder / f"..{tma_db}_20200108T000000Z.dump").write_bytes(b"dots")
    (folder / f"{tma_db}_20200109T000000Z.dump..").write_bytes(b"dots")
    # (the last good run's record, `.last-set-*.json`, is the tool's own and changes with every run)
    hostile = {name: state for name, state in snapshot(folder).items()
               if not name.startswith((first.name, ".last-set-"))}
    elsewhere = snapshot(outside)

    in_process = {**stack.env, "CELERY_BROKER_URL": ""}
    listed = run_cli(["list"], {**in_process, "COLUMNS": "250"}, stack.root, timeout=30)  # rows unwrapped
    assert listed.returncode == 0 and "Traceback" not in listed.output, listed.output
    rows = [line for line in listed.stdout.splitlines() if "_20" in line]
    assert "20200101T000000Z" not in listed.stdout and "20200102T000000Z" not in listed.stdout, \
        "symlinks and folders named like dumps are not listed"
    assert any(f"evil\\n{tma_db}_20990101T000000Z.dump" in row for row in rows), "a newline is shown escaped"
    assert any(f"[bold]{tma_db}" in row for row in rows), "markup in a name is shown as text"
    # the real backup; the hand-made dumps of 0105 (its .meta a FIFO) and 0106 (its .meta a link out);
    # and three names of other "databases": `evil\n…`, `[bold]…`, `..…`. Not `….dump..`, not `my backup.dump`.
    assert len(rows) == 6, listed.stdout
    assert sum("INCOMPLETE" in row for row in rows) == 5, listed.stdout
    verified = run_cli(["verify", str(ours("20200105T000000Z"))], in_process, stack.root, timeout=30)
    assert verified.returncode == 1 and "not a regular file" in error_lines(verified.stderr)[0], verified.output

    for _ in range(2):  # BACKUP_RETAIN_COUNT=1: each run prunes the previous one of ours, and only that
        result = run_cli(["backup"], stack.env, stack.root, timeout=120)
        assert result.returncode == 0, result.output
    complete = [entry.path for entry in catalogue.list_backups(folder, tma_db) if entry.complete]
    assert len(complete) == 1 and complete[0] != first and not first.exists()
    after = {name: state for name, state in snapshot(folder).items()
             if not name.startswith((complete[0].name, ".last-set-"))}
    assert after == hostile, "every hostile entry is exactly as it was"
    assert snapshot(outside) == elsewhere and secret.read_text() == "not a backup"
    status = run_cli(["status"], in_process, stack.root, timeout=30)
    assert status.returncode == 0, status.output
