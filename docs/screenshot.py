"""Make docs/flower-task.png: Flower's page of the `tma_backup.dump` task after a real backup.

Starts everything privately (as the tests do: a throw-away PostgreSQL 15 cluster with a TMA Cloud
shaped database `tma_cloud_storage`, a private Redis, one `celery -A worker worker -E`, and
`celery -A worker flower` with basic auth), runs `tma-backup backup` through the broker, then takes the
screenshot with headless Debian Chromium (`apt-get install chromium`). Checks that the page shows the
task's state and result and no password, and stops everything it started.

    .venv/bin/python docs/screenshot.py [--output docs/flower-task.png] [--task tma_backup.dump]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import services, tma_cloud  # noqa: E402
from tests.conftest import PASSWORD_ROLE, TEST_PASSWORD, base_env  # noqa: E402
from tests.flower_process import PASSWORD, USER, FlowerProcess  # noqa: E402

DATABASE = "tma_cloud_storage"
CHAIN = ("tma_backup.dump", "tma_backup.verify", "tma_backup.checksum", "tma_backup.meta", "tma_backup.prune")


def chromium_screenshot(url: str, output: Path, size: str = "1280,900") -> None:
    browser = shutil.which("chromium")
    if not browser:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="tma-chromium-") as profile:
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={output}",
             f"--window-size={size}", url],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        )
    if result.returncode != 0 or not output.exists():
        raise SystemExit(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "flower-task.png")
    parser.add_argument("--task", default="tma_backup.dump", choices=CHAIN)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tma-backup-demo-"))
    pg = redis = worker = flower = None
    try:
        pg = services.start_postgres()
        with pg.connect(autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{TEST_PASSWORD}'")
            tma_cloud.create_database(admin, DATABASE)
        with pg.connect(DATABASE, autocommit=True) as connection:
            tma_cloud.create_schema(connection)
            tma_cloud.populate(connection)
        redis = services.start_redis()
        env = base_env(pg, work / "backups", CELERY_BROKER_URL=redis.url, WORKER_HOST="backup-host-1",
                       DB_NAME=DATABASE, TEST_CWD=str(work))
        flower = FlowerProcess(env, work / "flower.log", work).start()
        worker = services.WorkerProcess("worker@backup-host-1", env, work / "worker.log").start()
        deadline = time.monotonic() + 30
        while not flower.sees_worker("worker@backup-host-1"):
            if time.monotonic() > deadline:
                raise SystemExit("Flower does not receive the worker's events")
            time.sleep(0.2)

        backup = subprocess.run([str(Path(sys.executable).with_name("tma-backup")), "backup"], env=env, cwd=work,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        print(backup.stderr, file=sys.stderr)
        if backup.returncode != 0:
            raise SystemExit(f"the backup failed ({backup.returncode})")

        deadline = time.monotonic() + 30
        while True:
            tasks = flower.tasks()
            states = {task["name"]: task["state"] for task in tasks.values()}
            if all(states.get(name) == "SUCCESS" for name in CHAIN):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"Flower did not show the chain as SUCCESS: {states}")
            time.sleep(0.2)
        [task_id] = [task_id for task_id, task in tasks.items() if task["name"] == options.task]

        status, page = flower.get(f"/task/{task_id}")
        if status != 200 or "SUCCESS" not in page or options.task not in page:
            raise SystemExit(f"the task page does not show the task: {status}")
        if TEST_PASSWORD in page:
            raise SystemExit("the task page shows the database password")
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{flower.port}/task/{task_id}"
        options.output.parent.mkdir(parents=True, exist_ok=True)
        chromium_screenshot(url, options.output)
        print(f"wrote {options.output} ({options.output.stat().st_size} bytes): {options.task} {task_id}")
        return 0
    finally:
        for process in (worker, flower):
            if process is not None:
                process.stop()
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.data_dir.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
