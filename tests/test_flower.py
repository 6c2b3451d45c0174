"""A real Flower process watching a real worker: the chain's tasks, their progress, and no secrets.

What Flower 2.2 really shows of our progress (checked here): it renders only Celery's known task fields.
A `task-progress` event makes the task's state PROGRESS and its `result=` summary ("counting rows",
"dumping: 12MB") the task's result, in the API and on the task page; `phase=` and `bytes=` are dropped.
When the task ends, its result is the return value, so the summaries are visible while a step runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.conftest import TEST_PASSWORD, base_env
from tests.flower_process import FlowerProcess
from tests.helpers import dump_waiting_on_lock, only_backup, table_locked, wait_for

CHAIN = ("tma_backup.dump", "tma_backup.verify", "tma_backup.checksum", "tma_backup.meta", "tma_backup.prune")
WORKER = "f@host-flower"


@pytest.fixture
def flower_stack(pg, redis_server, tma_db, tmp_path) -> Iterator[tuple[dict[str, str], FlowerProcess]]:
    broker = f"redis://127.0.0.1:{redis_server.port}/12"
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-flower",
                   DB_NAME=tma_db, TEST_CWD=str(tmp_path))
    flower = FlowerProcess(env, tmp_path / "flower.log", tmp_path)
    worker = services.WorkerProcess(WORKER, env, tmp_path / "worker.log")
    try:
        flower.start()
        worker.start()
        wait_for(lambda: flower.sees_worker(WORKER), timeout=30, what="Flower to receive the worker's events")
        yield env, flower
    finally:
        worker.stop()
        flower.stop()


def _pg_dump_writing_into(directory: Path) -> int | None:
    """The pid of the pg_dump whose --file is in this backup folder (ours only, never another test's)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_dump") and any(
                arg.startswith(f"--file={directory}/".encode()) for arg in argv):
            return int(pid)
    return None


def _task_of(flower: FlowerProcess, name: str) -> dict[str, Any] | None:
    found = [task for task in flower.tasks().values() if task.get("name") == name]
    return found[-1] if found else None


def test_flower_shows_the_chain_its_progress_and_no_password(pg, admin, flower_stack, tma_db, tmp_path):
    env, flower = flower_stack
    backups = Path(env["BACKUP_DIR"])
    seen: list[tuple[str, str]] = []

    def dump_shows(prefix: str) -> dict[str, Any] | None:
        task = _task_of(flower, "tma_backup.dump")
        if task:
            seen.append((task["state"], str(task.get("result"))))
        if task and task["state"] == "PROGRESS" and str(task.get("result")).startswith(prefix):
            return task
        return None

    stopped: int | None = None
    cli = None
    try:
        with table_locked(pg, tma_db):
            cli = subprocess.Popen([services.TMA_BACKUP, "backup"], env=env, cwd=tmp_path,
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL)
            wait_for(lambda: dump_waiting_on_lock(admin, tma_db), what="the dump to wait for the table lock")
            counting = wait_for(lambda: dump_shows("counting rows"), timeout=20,
                                what=f"Flower to show the dump counting rows (saw {seen[-3:]})")
            stopped = wait_for(lambda: _pg_dump_writing_into(backups), what="our pg_dump")
            os.kill(stopped, signal.SIGSTOP)  # the dump then stays in its "dumping: N" phase until SIGCONT
        dumping = wait_for(lambda: dump_shows("dumping: "), timeout=20,
                           what=f"Flower to show the bytes dumped so far (saw {seen[-3:]})")
        status, page = flower.get(f"/task/{dumping['uuid']}")
        assert status == 200 and "PROGRESS" in page and dumping["result"] in page, "the task page shows it"
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        _, stderr = cli.communicate(timeout=120)
        assert cli.returncode == 0, stderr
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        if cli and cli.poll() is None:
            cli.kill()
            cli.wait()
    assert counting["result"] == "counting rows"
    assert dumping["result"] == "dumping: 0B", "pg_dump -Fc writes its archive at the end; stopped, it has written 0"
    dump, meta = only_backup(backups, tma_db)

    # Flower lists the whole chain, every link SUCCESS, all under the kickoff as their root.
    def chain_done() -> dict[str, dict[str, Any]] | None:
        tasks = flower.tasks()
        states = {task["name"]: task["state"] for task in tasks.values()}
        return tasks if all(states.get(name) == "SUCCESS" for name in CHAIN) else None

    tasks = wait_for(chain_done, timeout=20, what="Flower to show the chain's five tasks as SUCCESS")
    [kickoff] = [task for task in tasks.values() if task["name"] == "tma_backup.backup"]
    assert kickoff["state"] == "SUCCESS"
    links = {task["name"]: task for task in tasks.values() if task["name"] in CHAIN}
    assert sorted(links) == sorted(CHAIN) and len(tasks) == 6, sorted(task["name"] for task in tasks.values())
    assert {task["root_id"] for task in links.values()} == {kickoff["uuid"]}
    assert {task["worker"] for task in tasks.values()} == {WORKER}
    assert dump.name in links["tma_backup.prune"]["result"] and meta.sha256 in links["tma_backup.prune"]["result"]

    # No password anywhere Flower answers: API, task pages, task list (page and its data), workers, config.
    paths = ["/api/tasks", "/tasks", "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0"
             "&order[0][dir]=asc&columns[0][data]=name", "/api/workers?refresh=1", "/workers",
             f"/worker/{WORKER}", "/api/task/types", "/broker", "/metrics", "/"]
    for task_id in tasks:
        paths += [f"/task/{task_id}", f"/api/task/info/{task_id}", f"/api/task/result/{task_id}"]
    answers = {path: flower.get(path) for path in paths}
    assert {path: status for path, (status, _) in answers.items() if status != 200} == {}
    assert "tma_backup.dump" in answers["/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0"
                                        "&order[0][dir]=asc&columns[0][data]=name"][1]
    assert "host-flower" in answers[f"/worker/{WORKER}"][1]
    conf = json.loads(answers["/api/workers?refresh=1"][1])[WORKER]["conf"]
    assert conf["task_serializer"] == "json"
    assert not {"sys", "get_settings", "SettingsError", "build_schedule", "annotations"} & set(conf), \
        "only real settings on Flower's worker page (worker/celery_config.py imports helpers privately)"
    leaking = [path for path, (_, body) in answers.items() if TEST_PASSWORD in body or "PGPASSWORD" in body]
    assert leaking == []
    assert TEST_PASSWORD not in flower.log()

    # Without credentials, or with wrong ones: 401 everywhere that shows tasks.
    kickoff_id = kickoff["uuid"]
    for path in ["/api/tasks", "/api/workers", "/tasks", "/", f"/task/{kickoff_id}",
                 f"/api/task/info/{kickoff_id}", f"/api/task/result/{kickoff_id}"]:
        assert flower.get(path, auth=False)[0] == 401, path
        assert flower.get(path, auth=("flower-user", "wrong"))[0] == 401, path
