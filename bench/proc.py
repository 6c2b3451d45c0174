"""Subprocesses for the benchmark: commands that die with us, process trees, and their memory."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO


class StepFailed(Exception):
    """A measured step did not succeed; the message is one line saying why."""


def run(argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
        stdout: int | object = subprocess.DEVNULL, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command in its own process group; on any exception (Ctrl-C included) kill the whole group.
    A non-zero exit raises StepFailed with the last line of stderr."""
    process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except BaseException:
        kill_group(process)
        raise
    if process.returncode != 0:
        lines = [line for line in (err or b"").decode("utf-8", "replace").splitlines() if line.strip()]
        raise StepFailed(f"{Path(argv[0]).name} exited {process.returncode}: {lines[-1] if lines else '(no stderr)'}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill_group(process: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """SIGTERM (after `grace` seconds of waiting, if any), then SIGKILL, to the process group we started."""
    if process.poll() is not None:
        return
    try:
        if grace > 0:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += children(current)
    return pids


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_rss(root: int) -> int:
    """Summed VmRSS of the worker's own processes (the celery main process and its pool children: every
    process in the tree running the same executable), not of the tools they start (pg_dump, docker)."""
    exe = _exe(root)
    return sum(rss_bytes(pid) for pid in tree(root) if exe is None or _exe(pid) == exe)


class RssSampler:
    """Samples `worker_rss(root)` every `interval` seconds in a thread; `peak` and `baseline` in bytes."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.baseline = worker_rss(root)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, worker_rss(self.root))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, worker_rss(self.root))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / (1024 * 1024)


def exclusive(folder: Path, name: str) -> IO[str] | None:
    """An exclusive lock on `folder/name` (made if missing), held as long as the returned file stays open;
    None when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / name, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def export_code(repo: Path, commit: str, target: Path) -> None:
    """worker/, tasks/ and beat_schedule.py as they are at `commit`, extracted into `target` (made here):
    the code a benchmark runs, which edits in the working tree cannot change half-way."""
    target.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit, "--",
                                "worker", "tasks", "beat_schedule.py"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise StepFailed(f"git archive {commit} failed")
