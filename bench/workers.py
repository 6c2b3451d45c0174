"""Real tma-backup workers as subprocesses on a dedicated Redis database, and chains followed to the end.

Each worker gets its own settings (BACKUP_COMPRESSION, WORKER_HOST, BACKUP_DIR, DB_MODE …) in its
environment and runs in a folder without a `.env`, so nothing leaks in from the developer's settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from bench.proc import StepFailed, kill_group

# Settings a worker must never inherit from the shell that started the benchmark.
_SETTING_PREFIXES = ("DB_", "BACKUP_", "CELERY_", "RESTORE_", "REPOSITORY_", "PG", "WORKER_HOST", "FOLLOW_TIMEOUT")
STEP_NAMES = ("kickoff", "dump", "verify", "checksum", "meta", "prune")  # without a repository


def clean_environment(settings: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_SETTING_PREFIXES)}
    env.update(settings)
    return env


def host_queue(host: str) -> str:
    return f"tma_backup.host.{host}"  # worker.celery_app.host_queue


def bench_app(broker_url: str) -> Celery:
    """A client-only Celery app: sends by task name, reads results; imports nothing of the project."""
    app = Celery("tma_bench", broker=broker_url, backend=broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True)
    return app


@dataclass
class Worker:
    key: str
    settings: dict[str, str]
    folder: Path
    concurrency: int = 1
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path = self.folder / "worker.log"

    @property
    def host(self) -> str:
        return self.settings["WORKER_HOST"]

    @property
    def nodename(self) -> str:
        return f"bench-{self.key}@{self.host}"

    @property
    def backup_dir(self) -> Path:
        return Path(self.settings["BACKUP_DIR"])

    def start(self) -> None:
        self.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-E", "-c", str(self.concurrency),
                "--loglevel=INFO", "-n", self.nodename, "--without-mingle", "--without-gossip"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=self.folder, env=clean_environment(self.settings),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def wait_ready(self, app: Celery, timeout: float) -> None:
        """Until the worker answers a ping; StepFailed (with its log's last lines) if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise StepFailed(f"worker {self.key} exited ({code}) before it was ready: {self.log_tail()}")
            if app.control.ping(destination=[self.nodename], timeout=0.5):
                return
        raise StepFailed(f"worker {self.key} did not answer within {timeout:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            kill_group(self.process, grace=15)
            self.process = None

    def clear_backups(self) -> None:
        for path in self.backup_dir.iterdir() if self.backup_dir.exists() else []:
            if path.is_file():
                path.unlink()


def _epoch(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return None


@dataclass
class ChainRun:
    wall: float  # dispatch → the final link's SUCCESS, seconds
    summary: dict[str, Any]  # the final link's result
    steps: dict[str, float]  # seconds each link added (from the results' date_done)
    host: str


def _failed(result: AsyncResult, what: str) -> StepFailed:
    info = result.info
    return StepFailed(f"{what} {result.state.lower()}: {info!s}"[:400])


def dispatch_backup(app: Celery, database: str, queue: str) -> tuple[float, AsyncResult]:
    started = time.time()
    return started, app.send_task("tma_backup.backup", kwargs={"database": database}, queue=queue)


def follow_chain(app: Celery, started: float, kickoff: AsyncResult, timeout: float, poll: float = 0.02) -> ChainRun:
    """Wait for the kickoff, then for every link it started; any FAILURE raises StepFailed."""
    deadline = time.monotonic() + timeout
    while kickoff.state not in ("SUCCESS", "FAILURE", "REVOKED"):
        if time.monotonic() > deadline:
            raise StepFailed(f"kickoff {kickoff.id} not done after {timeout:.0f}s (is a worker consuming its queue?)")
        time.sleep(poll)
    if kickoff.state != "SUCCESS":
        raise _failed(kickoff, "kickoff")
    info = kickoff.result
    if "skipped" in info:
        raise StepFailed(f"kickoff skipped: {info['skipped']}")
    links = [AsyncResult(step, app=app) for step in info["steps"]]
    names = ["kickoff", *info.get("step_names", STEP_NAMES[1:])]  # with BACKUP_REPOSITORY, offsite before prune
    pending = list(links)
    while pending:
        if time.monotonic() > deadline:
            raise StepFailed(f"chain of {info['database']} not done after {timeout:.0f}s")
        for link in list(pending):
            state = link.state
            if state == "SUCCESS":
                pending.remove(link)
            elif state in ("FAILURE", "REVOKED"):
                raise _failed(link, f"link {names[links.index(link) + 1]}")
            else:
                break  # links finish in order: wait for this one
        if pending:
            time.sleep(poll)
    observed = time.time() - started
    done = [_epoch(kickoff.date_done)] + [_epoch(link.date_done) for link in links]
    steps: dict[str, float] = {}
    if all(value is not None for value in done):
        previous = started
        for name, value in zip(names, done, strict=False):
            steps[name] = round(value - previous, 4)  # type: ignore[operator]
            previous = value  # type: ignore[assignment]
    final = done[-1]
    wall = final - started if final is not None and 0 < final - started <= observed + 0.01 else observed
    return ChainRun(wall=wall, summary=links[-1].result, steps=steps, host=info["host"])


def run_chain(app: Celery, worker: Worker, database: str, timeout: float) -> ChainRun:
    """One backup of `database` by `worker` (its own host queue), dispatch → final SUCCESS."""
    started, kickoff = dispatch_backup(app, database, host_queue(worker.host))
    return follow_chain(app, started, kickoff, timeout)
