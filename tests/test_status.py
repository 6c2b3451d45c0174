"""`tma-backup status` (and `--json`): exit 1 for every condition that means "you could not restore
tonight", each a case, the same facts in both forms; `status`, `list` and `verify` through the workers,
which answer for their own BACKUP_DIR, and `--local`. Real PostgreSQL, restic, Redis and workers.

The module makes one real backup; each case copies it into a folder of its own under the timestamp the
case needs (its `.meta` rewritten to match), so that old backups, stale drills and uploads the set lacks
are crafted, not waited for."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests import services, tma_cloud
from tests.conftest import TEST_PASSWORD, CliResult, base_env, run_cli
from tests.helpers import error_lines, only_backup, settings_for
from worker.archive import catalogue
from worker.archive.meta import BackupMeta
from worker.health.drill_due import due_since, fire_times_before
from worker.repository.sets import set_tags
from worker.restore import drill_record, swap

REPOSITORY_PASSWORD = "Status-Repo-Pw-7c41e9"
OLD_KEY, NEW_KEY = "Old-File-Key-3b9f", "New-File-Key-8d20"
UTC = timezone.utc


@dataclasses.dataclass
class Source:
    database: str
    dump: Path
    meta: BackupMeta


@pytest.fixture(scope="module")
def source(pg: services.PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """One real backup of a TMA-shaped database, made once (in-process) for the module."""
    name = tma_cloud.create_populated(pg, f"tma_status_{uuid.uuid4().hex[:8]}")
    root = tmp_path_factory.mktemp("status-source")
    result = run_cli(["backup"], base_env(pg, root / "backups", DB_NAME=name), root)
    assert result.returncode == 0, result.output
    dump, meta = only_backup(root / "backups", name)
    yield Source(name, dump, meta)
    with pg.connect(autocommit=True) as admin:
        tma_cloud.drop_database(admin, name)


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def place(source: Source, folder: Path, moment: datetime, database: str | None = None, **extra: str) -> Path:
    """A copy of the real backup in `folder`, named and stamped `moment`, its .meta carrying `extra`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = database or source.database
    timestamp = catalogue.utc_timestamp(moment)
    dump = folder / catalogue.backup_name(database, timestamp)
    shutil.copyfile(source.dump, dump)
    meta = dataclasses.replace(source.meta, timestamp=timestamp, database=database,
                               extra={**source.meta.extra, **extra})
    catalogue.meta_path(dump).write_text(meta.render())
    return dump


def status(env: dict[str, str], cwd: Path, *args: str) -> tuple[CliResult, CliResult, dict[str, Any]]:
    """`status` and `status --json`, run side by side: both results, and the JSON parsed. Both exit alike."""
    with ThreadPoolExecutor(2) as pool:
        human_run = pool.submit(run_cli, ["status", *args], env, cwd, None, 120)
        as_json = run_cli(["status", "--json", *args], env, cwd, timeout=120)
        human = human_run.result()
    assert human.returncode == as_json.returncode, (human.output, as_json.output)
    assert "Traceback" not in human.output + as_json.output
    facts = json.loads(as_json.stdout)
    assert facts["ok"] is (human.returncode == 0)
    return human, as_json, facts


def assert_fails_with(human: CliResult, as_json: CliResult, facts: dict[str, Any], *words: str) -> str:
    """Exit 1, one [ERROR] line naming `words`, and the same problem in the JSON."""
    assert human.returncode == 1, human.output
    [line] = error_lines(human.stderr)
    assert all(word in line for word in words), line
    assert error_lines(as_json.stderr) == [line], as_json.stderr
    assert any(all(word in problem for word in words) for problem in facts["problems"]), facts["problems"]
    return line


@pytest.fixture
def env(pg: services.PostgresServer, source: Source, tmp_path: Path) -> dict[str, str]:
    """In-process (no broker), against the module's database, with an empty BACKUP_DIR of its own."""
    (tmp_path / "backups").mkdir(mode=0o700)
    return base_env(pg, tmp_path / "backups", DB_NAME=source.database)


def backups(env: dict[str, str]) -> Path:
    return Path(env["BACKUP_DIR"])


# ---------------------------------------------------------------------------------------------------
# Each condition of `status`, in-process


def test_a_fresh_backup_with_a_recent_drill_is_exit_0_with_its_facts(source, env, tmp_path):
    dump = place(source, backups(env), ago(minutes=5))
    drill_record.record_drill(settings_for(env), source.database, {"result": "pass", "at": catalogue.utc_timestamp(ago(minutes=4)),
                                                       "file": str(dump), "tables": 9, "rows": 1})
    human, as_json, facts = status(env, tmp_path)
    assert human.returncode == 0 and error_lines(human.stderr) == [], human.output
    assert f"Newest     : {dump.name}" in human.stderr and "Age        : 0.1 h" in human.stderr
    assert "Last drill : passed at" in human.stderr and "Backups are current." in human.stderr
    assert facts["problems"] == [] and facts["source"] == "local" and facts["database"] == source.database
    assert facts["backup"]["file"] == dump.name and facts["backup"]["size"] == dump.stat().st_size
    assert 0.05 < facts["backup"]["age_hours"] < 0.2
    assert facts["drill"]["result"] == "pass" and facts["drill"]["file"] == dump.name and facts["drill"]["problem"] is None
    assert facts["connections"] == {**facts["connections"], "checked": True, "refusing": False, "problem": None}
    assert facts["repository"] is None and facts["uploads"] is None and facts["vault"] is None
    assert set(facts) == {"database", "source", "checked_at", "ok", "problems", "warnings", "hosts", "backup", "drill",
                          "repository", "uploads", "connections", "vault"}
    assert as_json.stderr == "", "--json: nothing but the object, on stdout"


def test_no_backup_or_one_older_than_the_limit_is_exit_1(source, env, tmp_path):
    human, as_json, facts = status(env, tmp_path)
    assert_fails_with(human, as_json, facts, "no complete backup", repr(source.database))
    assert facts["backup"]["file"] is None

    old = place(source, backups(env), ago(hours=30))
    human, as_json, facts = status(env, tmp_path)
    assert_fails_with(human, as_json, facts, "is 30.0 h old, over the limit", "BACKUP_MAX_AGE_HOURS=26")
    assert f"Newest     : {old.name}" in human.stderr
    assert facts["backup"]["file"] == old.name and 29.9 < facts["backup"]["age_hours"] < 30.1
    assert "Last drill : none recorded" in human.stderr, "30 h of history: no drill yet is only a warning"
    relaxed = {**env, "BACKUP_MAX_AGE_HOURS": "48"}
    assert run_cli(["status"], relaxed, tmp_path).returncode == 0


def test_a_failed_last_drill_is_exit_1(source, env, tmp_path):
    dump = place(source, backups(env), ago(minutes=10))
    drill_record.record_drill(settings_for(env), source.database, {"result": "fail", "at": catalogue.utc_timestamp(ago(minutes=2)),
                                                       "file": str(dump), "error": "row counts differ: pgboss.job"})
    human, as_json, facts = status(env, tmp_path)
    assert_fails_with(human, as_json, facts, "last restore drill", "failed", "row counts differ")
    assert "Last drill : FAILED at" in human.stderr
    assert facts["drill"]["result"] == "fail" and facts["drill"]["error"] == "row counts differ: pgboss.job"


def test_no_drill_passed_within_two_drill_periods_is_exit_1_but_a_fresh_install_is_not(source, env, tmp_path):
    every_minute = {**env, "BACKUP_DRILL_SCHEDULE": "* * * * *"}  # a drill is due every minute (plus an hour's grace)
    dump = place(source, backups(env), ago(minutes=10))
    human, as_json, facts = status(every_minute, tmp_path)
    assert human.returncode == 0, "a fresh install with no drill yet passes, with a warning"
    assert "Last drill : none recorded" in human.stderr and facts["drill"]["warning"] and not facts["drill"]["problem"]
    settings = settings_for(env)
    record = {"result": "pass", "file": str(dump), "tables": 9, "rows": 1}
    drill_record.record_drill(settings, source.database, {**record, "at": catalogue.utc_timestamp(ago(minutes=30))})
    human, _, facts = status(every_minute, tmp_path)
    assert human.returncode == 0, human.output

    drill_record.record_drill(settings, source.database, {**record, "at": catalogue.utc_timestamp(ago(hours=3))})
    human, as_json, facts = status(every_minute, tmp_path)
    assert_fails_with(human, as_json, facts, "no restore drill", "passed since", "BACKUP_DRILL_SCHEDULE=* * * * *")
    assert ", none since" in human.stderr
    due = catalogue.parse_timestamp(facts["drill"]["due_since"])
    assert ago(hours=1, minutes=8) < due < ago(hours=1), due
    assert run_cli(["status"], env, tmp_path).returncode == 0, "weekly (the default): three hours is recent"

    # No drill ever recorded, and a backup older than the last two scheduled drills: beat never drilled.
    drill_record.record_path(settings, source.database).unlink()
    place(source, backups(env), ago(hours=3))
    human, as_json, facts = status(every_minute, tmp_path)
    assert_fails_with(human, as_json, facts, "no restore drill recorded", "before the last two scheduled drills")

    # The schedule drills DB_NAME only: for another database a stale drill is a warning, not a failure.
    other = f"{source.database}_other"
    place(source, backups(env), ago(minutes=10), database=other)
    drill_record.record_drill(settings, other, {**record, "at": catalogue.utc_timestamp(ago(hours=3))})
    human, _, facts = status(every_minute, tmp_path, "--database", other)
    assert human.returncode == 0, human.output
    assert facts["drill"]["scheduled"] is False and "passed since" in facts["drill"]["warning"]


def test_drill_due_times_follow_the_schedules_own_slots():
    monday = datetime(2026, 1, 12, 10, 0, tzinfo=UTC)
    weekdays = fire_times_before("0 4 * * 1-5", monday, 3)
    assert weekdays == [datetime(2026, 1, 12, 4, 0, tzinfo=UTC), datetime(2026, 1, 9, 4, 0, tzinfo=UTC),
                        datetime(2026, 1, 8, 4, 0, tzinfo=UTC)]
    assert fire_times_before("* * * * *", monday, 2) == [monday, monday - timedelta(minutes=1)]
    # weekly (the default, Sunday 04:00): the second-latest Sunday at least an hour old, less 5 minutes' skew
    assert due_since("0 4 * * 0", datetime(2026, 1, 11, 4, 30, tzinfo=UTC)) == datetime(2025, 12, 28, 3, 55, tzinfo=UTC)
    assert due_since("0 4 * * 0", datetime(2026, 1, 11, 5, 30, tzinfo=UTC)) == datetime(2026, 1, 4, 3, 55, tzinfo=UTC)
    assert due_since("0 0 29 2 *", datetime(2026, 1, 1, tzinfo=UTC)) == datetime(2020, 2, 28, 23, 55, tzinfo=UTC)


def restic(repository: Path, *args: str, cwd: Path | None = None) -> str:
    environment = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(repository.parent),
                   "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD": REPOSITORY_PASSWORD}
    return subprocess.run(["restic", *args], env=environment, cwd=cwd, check=True, capture_output=True,
                          text=True, timeout=120).stdout


def send_set(repository: Path, dump: Path, database: str) -> None:
    """`dump` and its .meta as one of our sets, tagged as the offsite link tags them."""
    tags = [option for tag in set_tags(database, catalogue.timestamp_of(dump, database), "crafted", None)
            for option in ("--tag", tag)]
    restic(repository, "backup", "--host", "crafted", *tags, dump.name, dump.name + ".meta", cwd=dump.parent)


def test_a_repository_that_cannot_be_read_or_whose_newest_set_is_too_old_is_exit_1(
        source, env, restic_bin, tmp_path):
    repository = tmp_path / "offsite"
    with_repository = {**env, "BACKUP_REPOSITORY": str(repository), "BACKUP_REPOSITORY_PASSWORD": REPOSITORY_PASSWORD}
    fresh = place(source, backups(env), ago(minutes=5))
    human, as_json, facts = status(with_repository, tmp_path)  # no repository at that path
    assert_fails_with(human, as_json, facts, "the repository cannot be read", "no restic repository at")
    assert "Off site   : cannot read the repository" in human.stderr and facts["repository"]["error"]

    restic(repository, "init")
    wrong = {**with_repository, "BACKUP_REPOSITORY_PASSWORD": "Not-The-Password-1"}
    human, as_json, facts = status(wrong, tmp_path)
    assert_fails_with(human, as_json, facts, "cannot be read", "refused the password")
    assert "Not-The-Password-1" not in human.output + as_json.output

    old = place(source, tmp_path / "crafted", ago(hours=40))
    send_set(repository, old, source.database)
    human, as_json, facts = status(with_repository, tmp_path)
    assert_fails_with(human, as_json, facts, "newest set", "is 40.0 h old, over the limit")
    assert facts["repository"]["timestamp"] == catalogue.timestamp_of(old, source.database)
    assert facts["repository"]["sets"] == 1 and facts["backup"]["problem"] is None, "the local backup is current"

    send_set(repository, fresh, source.database)
    human, _, facts = status(with_repository, tmp_path)
    assert human.returncode == 0, human.output
    assert "Backups are current, here and off site." in human.stderr
    assert facts["repository"]["sets"] == 2 and facts["repository"]["problem"] is None
    assert REPOSITORY_PASSWORD not in human.output + json.dumps(facts)


def test_uploads_the_newest_set_lacks_are_exit_1_and_a_different_file_key_a_warning(source, env, tmp_path):
    names = ["2025/01/a.bin", "2025/01/b.bin"]
    complete = place(source, backups(env), ago(minutes=20), uploads_missing="0", uploads_missing_names="[]")
    human, _, facts = status(env, tmp_path)
    assert human.returncode == 0 and "Uploads    : every upload" in human.stderr, human.output
    assert facts["uploads"]["missing"] == 0 and facts["uploads"]["file"] == complete.name

    lacking = place(source, backups(env), ago(minutes=10), uploads_missing="2",
                    uploads_missing_names=json.dumps(names))
    human, as_json, facts = status(env, tmp_path)
    assert_fails_with(human, as_json, facts, "lacks 2 upload(s)", lacking.name, "2025/01/a.bin")
    assert facts["uploads"]["missing"] == 2 and facts["uploads"]["missing_names"] == names

    import hashlib

    fingerprint = hashlib.sha256(OLD_KEY.encode()).hexdigest()
    keyed = place(source, backups(env), ago(minutes=5), uploads_missing="0", file_encryption_key_sha256=fingerprint)
    human, as_json, facts = status({**env, "FILE_ENCRYPTION_KEY": NEW_KEY}, tmp_path)
    assert human.returncode == 0, human.output  # a warning, never a failure
    assert facts["backup"]["file"] == keyed.name and facts["backup"]["file_encryption_key"] == "differs"
    assert "Upload key :" in human.stderr and any(fingerprint[:12] in warning for warning in facts["warnings"])
    assert NEW_KEY not in human.output + as_json.output and OLD_KEY not in human.output + as_json.output
    for key, verdict in ((OLD_KEY, "matches"), (None, "not set")):
        result = run_cli(["status", "--json"], {**env, **({"FILE_ENCRYPTION_KEY": key} if key else {})}, tmp_path)
        facts = json.loads(result.stdout)
        assert result.returncode == 0 and facts["backup"]["file_encryption_key"] == verdict, result.output
        assert any(fingerprint[:12] in warning for warning in facts["warnings"]) is (verdict == "not set")
        assert OLD_KEY not in result.output


def test_a_database_left_refusing_connections_is_exit_1(source, env, admin, tmp_path):
    place(source, backups(env), ago(minutes=5))
    swap.mark_swapping(admin, source.database, "crashed-run")
    swap.set_allow_connections(admin, source.database, False)
    try:
        human, as_json, facts = status(env, tmp_path)
        assert_fails_with(human, as_json, facts, repr(source.database), "refusing connections", "tma-backup repair")
        assert facts["connections"]["refusing"] is True and "Connections: REFUSED" in human.stderr
    finally:
        swap.set_allow_connections(admin, source.database, True)
        swap.clear_mark(admin, source.database)
    assert run_cli(["status"], env, tmp_path).returncode == 0


def test_several_problems_are_one_error_line_and_bad_settings_exit_2(source, env, tmp_path):
    dump = place(source, backups(env), ago(hours=30), uploads_missing="1", uploads_missing_names='["x.bin"]')
    drill_record.record_drill(settings_for(env), source.database, {"result": "fail", "at": catalogue.utc_timestamp(ago(hours=29)),
                                                       "file": str(dump), "error": "boom"})
    human, as_json, facts = status(env, tmp_path)
    assert human.returncode == 1, human.output
    [line] = error_lines(human.stderr)
    assert line.startswith("[ERROR] 3 problems: ") and error_lines(as_json.stderr) == [line], line
    assert [word in problem for word, problem in zip(("over the limit", "failed", "lacks 1 upload(s)"),
                                                     facts["problems"], strict=True)] == [True] * 3, facts["problems"]
    assert all(problem in line for problem in facts["problems"])
    for args, variable in ((["status"], "BACKUP_MAX_AGE_HOURS"), (["status", "--json"], "BACKUP_DRILL_SCHEDULE")):
        bad = run_cli(args, {**env, "BACKUP_MAX_AGE_HOURS": "-1"} if variable == "BACKUP_MAX_AGE_HOURS"
                      else {**env, "BACKUP_DRILL_SCHEDULE": "61 * * * *"}, tmp_path)
        assert bad.returncode == 2 and bad.stdout == "", bad.output
        [line] = error_lines(bad.stderr)
        assert line.startswith(f"[ERROR] {variable}:"), line
    assert run_cli(["status", "--local", "--host", "x"], env, tmp_path).returncode == 2


# ---------------------------------------------------------------------------------------------------
# Through the workers: each host answers for its own BACKUP_DIR


def start_worker(pg: services.PostgresServer, broker: str, host: str, folder: Path, database: str,
                 cwd: Path) -> services.WorkerProcess:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = base_env(pg, folder, CELERY_BROKER_URL=broker, WORKER_HOST=host, DB_NAME=database, TEST_CWD=str(cwd))
    return services.WorkerProcess(f"status@{host}", env, cwd / f"{host}.log").start()


def test_status_list_and_verify_ask_the_workers_and_local_looks_here(pg, redis_server, source, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/11"
    worker_dir = tmp_path / "worker-a-backups"
    dump = place(source, worker_dir, ago(minutes=5))
    laptop = tmp_path / "laptop-backups"
    laptop.mkdir(mode=0o700)
    cli = base_env(pg, laptop, CELERY_BROKER_URL=broker, DB_NAME=source.database)
    a = start_worker(pg, broker, "host-status-a", worker_dir, source.database, tmp_path)
    b = None
    try:
        human, as_json, facts = status(cli, tmp_path)
        assert human.returncode == 0, human.output
        assert f"Newest     : {dump.name} (on host-status-a)" in human.stderr and "(asked host-status-a)" in human.stderr
        assert facts["source"] == "workers" and facts["backup"]["folder"] == str(worker_dir)
        assert facts["hosts"] == {"host-status-a": {"answered": True, "ok": True, "problems": [],
                                                    "warnings": facts["warnings"]}}
        local = run_cli(["status", "--local"], cli, tmp_path)
        assert local.returncode == 1 and f"no complete backup of {source.database!r} in {laptop}" in \
            error_lines(local.stderr)[0], local.output

        listed = run_cli(["list"], {**cli, "COLUMNS": "250"}, tmp_path)
        assert listed.returncode == 0 and f"Backups in {worker_dir} on host-status-a" in listed.stderr, listed.output
        assert [line for line in listed.stdout.splitlines() if dump.name in line and "complete" in line]

        verified = run_cli(["verify", dump.name], cli, tmp_path)
        assert verified.returncode == 0, verified.output
        assert f"File       : {dump} (on host-status-a)" in verified.stderr and "Backup is intact." in verified.stderr
        here = run_cli(["verify", "--local", dump.name], cli, tmp_path)
        assert here.returncode == 1 and "no such backup file" in error_lines(here.stderr)[0], here.output
        damaged = worker_dir / catalogue.backup_name(source.database, catalogue.utc_timestamp(ago(hours=1)))
        damaged.write_bytes(b"\0" + dump.read_bytes()[1:])
        shutil.copyfile(catalogue.meta_path(dump), catalogue.meta_path(damaged))
        bad = run_cli(["verify", damaged.name], cli, tmp_path)
        assert bad.returncode == 1, bad.output
        [line] = error_lines(bad.stderr)
        assert "SHA-256 mismatch" in line and damaged.name in line, line
        damaged.unlink()
        catalogue.meta_path(damaged).unlink()

        # A second host without backups: the answer is still the newest backup, wherever it is.
        b = start_worker(pg, broker, "host-status-b", tmp_path / "worker-b-backups", source.database, tmp_path)
        human, as_json, facts = status(cli, tmp_path)
        assert human.returncode == 0, human.output
        assert set(facts["hosts"]) == {"host-status-a", "host-status-b"} and facts["backup"]["host"] == "host-status-a"
        assert facts["hosts"]["host-status-b"]["ok"] is False, "b on its own has no backup"
        only_b = run_cli(["status", "--host", "host-status-b"], cli, tmp_path)
        assert only_b.returncode == 1 and "no complete backup" in error_lines(only_b.stderr)[0], only_b.output
        assert run_cli(["verify", dump.name], cli, tmp_path).returncode == 0, "found on a, not on b: fine"
        listed = run_cli(["list"], cli, tmp_path)
        assert "on host-status-a" in listed.stderr and "on host-status-b" in listed.stderr, listed.output
        unknown = run_cli(["status", "--host", "host-nowhere"], cli, tmp_path)
        assert unknown.returncode == 1 and "host-status-a, host-status-b" in error_lines(unknown.stderr)[0]
        for worker in (a, b):
            assert TEST_PASSWORD not in worker.log()
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_without_an_answering_worker_each_command_says_so_in_one_line_and_suggests_local(
        pg, redis_server, source, tmp_path):
    (tmp_path / "backups").mkdir(mode=0o700)
    cli = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/15",
                   DB_NAME=source.database)
    for command in (["status", "--json"], ["list"], ["verify", "x.dump"]):
        result = run_cli(command, cli, tmp_path, timeout=60)
        assert result.returncode == 1, (command, result.output)
        [line] = error_lines(result.stderr)
        assert "no tma-backup worker answered" in line and f"tma-backup {command[0]} --local" in line, line
        # status --json still prints its one object (tests/test_status_no_worker.py); the others print nothing
        assert (json.loads(result.stdout)["problems"] == [line.removeprefix("[ERROR] ")] if command[0] == "status"
                else result.stdout == "") and "Traceback" not in result.output
    gone = {**cli, "CELERY_BROKER_URL": f"redis://127.0.0.1:{services.free_port()}/0"}
    result = run_cli(["status"], gone, tmp_path, timeout=60)
    assert result.returncode == 1 and "cannot reach the broker" in error_lines(result.stderr)[0], result.output
