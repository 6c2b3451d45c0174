"""Celery beat for real: `celery -A worker beat` and `celery -A worker worker -B`, each with a schedule
of every minute and a real worker, dispatch the chain and a backup completes. A bad cron expression
stops beat before it starts, with one line naming the variable and exit code 2.

Both variants run side by side (their own Redis database, their own PostgreSQL database and backup
folder), so together they cost one minute slot: at most about a minute of waiting.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services
from tests.conftest import base_env
from tests.helpers import backups_in, leftovers, only_backup, wait_for

SENT_LINE = "Sending due task nightly-backup (tma_backup.backup)"


def _celery(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", *args], env=env, cwd=cwd,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Variant:
    name: str
    database: str
    backups: Path
    scheduler_log: Path
    worker: services.WorkerProcess
    beat: subprocess.Popen[bytes] | None = None

    def completed(self) -> bool:
        found = backups_in(self.backups, self.database) if self.backups.exists() else []
        # the chain's last link logged, not only the .meta written (the prune link runs after it)
        return (any(path.with_name(path.name + ".meta").exists() for path in found)
                and re.search(r"Task tma_backup\.prune\[[^\]]+\] succeeded", self.worker.log()) is not None)


@pytest.mark.timeout(180)
def test_beat_and_worker_with_embedded_beat_each_run_the_scheduled_backup(pg, admin, redis_server, tma_db,
                                                                         tmp_path):
    second_db = f"{tma_db}_b"
    admin.execute(f'CREATE DATABASE "{second_db}" TEMPLATE "{tma_db}"')
    # Both schedulers must start within the same minute to share its slot.
    if time.time() % 60 > 53:
        time.sleep(61 - time.time() % 60)
    variants: list[Variant] = []
    try:
        for name, database, redis_db in (("beat", tma_db, 10), ("embedded", second_db, 11)):
            directory = tmp_path / name
            directory.mkdir()
            env = base_env(pg, directory / "backups", CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{redis_db}",
                           WORKER_HOST=f"host-{name}", DB_NAME=database, BACKUP_SCHEDULE="* * * * *",
                           TEST_CWD=str(directory))
            worker = services.WorkerProcess(f"w@host-{name}", env, directory / "worker.log")
            variant = Variant(name, database, directory / "backups", directory / "worker.log", worker)
            if name == "beat":  # a separate `celery -A worker beat` process beside a plain worker
                variant.scheduler_log = directory / "beat.log"
                variant.beat = _celery(["beat", "--loglevel=INFO", "-s", str(directory / "beat-schedule")],
                                       env, directory, variant.scheduler_log)
                worker.start(wait=False)
            else:  # `celery -A worker worker -B`: the worker runs beat itself
                worker.start(["-B", "-s", str(directory / "beat-schedule")], wait=False)
            variants.append(variant)
        for variant in variants:
            variant.worker.wait_ready()
        started = time.monotonic()
        wait_for(lambda: all(variant.completed() for variant in variants), timeout=100, interval=0.5,
                 what="a scheduled backup to complete in both variants: "
                      + "; ".join(f"{v.name}: {v.scheduler_log.read_text()[-1500:]}" for v in variants))
        waited = time.monotonic() - started
        for variant in variants:
            assert variant.beat is None or variant.beat.poll() is None, "beat is still running"
            scheduler = variant.scheduler_log.read_text()
            assert SENT_LINE in scheduler, f"{variant.name}: beat sent the nightly-backup entry"
            worker_log = variant.worker.log()
            assert "Task tma_backup.backup[" in worker_log and "succeeded" in worker_log
            for step in ("dump", "verify", "checksum", "meta", "prune"):
                assert f"Task tma_backup.{step}[" in worker_log, f"{variant.name}: {step} ran"
            dump, meta = only_backup(variant.backups, variant.database)
            assert meta.database == variant.database and meta.toc_entries > 0
            assert leftovers(variant.backups) == []
        assert waited < 75, f"one minute slot is enough (waited {waited:.0f}s)"
    finally:
        for variant in variants:
            if variant.beat is not None:
                _stop(variant.beat)
            variant.worker.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{second_db}" WITH (FORCE)')


@pytest.mark.parametrize("variable, value", [("BACKUP_SCHEDULE", "bad"), ("BACKUP_SCHEDULE", "61 * * * *"),
                                             ("BACKUP_DRILL_SCHEDULE", "0 4 * *")])
@pytest.mark.parametrize("command", [["beat"], ["worker", "-B"]], ids=["beat", "worker-B"])
def test_a_bad_cron_expression_is_one_line_naming_the_variable_and_exit_2(tmp_path, variable, value, command):
    env = {key: item for key, item in os.environ.items() if not key.startswith(("DB_", "BACKUP_", "CELERY_"))}
    # nothing listens there: if beat got past its settings it would hang retrying, not exit 2
    env.update({variable: value, "CELERY_BROKER_URL": f"redis://127.0.0.1:{services.free_port()}/0",
                "PYTHONPATH": str(services.REPO)})
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", *command], env=env, cwd=tmp_path,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"[ERROR] {variable}: ") and repr(value) in line, line
    assert not list(tmp_path.iterdir()), "nothing written: no schedule file"
