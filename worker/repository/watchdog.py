"""The watchdog over a running restic: stopped once it has made no progress for REPOSITORY_STALL_TIMEOUT
seconds, whatever the command and the backend.

A server can fail in two ways that restic waits out for far too long:
- it refuses or answers errors: restic retries with back-off for a quarter of an hour or more, printing
  "retrying after" lines on stderr; REPOSITORY_STALL_TIMEOUT of nothing but those lines is a stall;
- it goes silent (a stopped process, a frozen machine, a path that drops the answers: the kernel or a
  middle box still accepts the connection and the request): restic 0.14's HTTP client has no timeout
  for an answer, so it waits forever, printing nothing, or only its status lines.

Progress is what the kernel counts for the process and its descendants (a wrapper that does not exec
restic; ssh for `sftp:`, rclone for `rclone:`), read from /proc every POLL_SECONDS:
- bytes: rchar + wchar (every read and write, sockets and pipes included: the whole conversation with
  the server passes there) and read_bytes + write_bytes (storage: what a stat() has to fetch), minus
  the bytes we read from its stdout and stderr pipes: its JSON status lines, which go on while it
  waits, are no progress. Growth by more than SLACK_BYTES past the highest level seen is progress (a
  status line that restic wrote and we have not read yet is a few hundred bytes; a link of 4 KiB/s
  moves more than SLACK_BYTES within the shortest REPOSITORY_STALL_TIMEOUT, 5 s);
- CPU: more than BUSY_SHARE of a core over a poll (restic comparing a large unchanged tree with its
  parent: lstat and computing, no reads). Waiting, restic takes about 0.1 % (measured: 10 ms in 10 s).
A poll costs about 75 µs of CPU (restic with 10 threads): 0.015 % of a core.
Where /proc/<pid>/io cannot be read (an unusual /proc), only the retry rule applies: a slow command is
never taken for a stalled one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType

POLL_SECONDS = 0.5
SLACK_BYTES = 16 * 1024
BUSY_SHARE = 0.1
RETRYING = re.compile(r"retrying after")
_TICKS = os.sysconf("SC_CLK_TCK")
_IO_FIELDS = (b"rchar", b"wchar", b"read_bytes", b"write_bytes")


@dataclass(frozen=True)
class Counters:
    moved: int | None  # bytes read and written, None when /proc/<pid>/io cannot be read
    cpu: float  # seconds, user and system


def counters(pid: int) -> Counters | None:
    """The kernel's counters of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            after_name = handle.read().rpartition(b")")[2].split()
    except OSError:
        return None
    cpu = (int(after_name[11]) + int(after_name[12])) / _TICKS  # utime, stime (fields 14 and 15)
    try:
        with open(f"/proc/{pid}/io", "rb") as handle:
            fields = dict(line.split(b":", 1) for line in handle.read().splitlines() if b":" in line)
        moved: int | None = sum(int(fields[name]) for name in _IO_FIELDS)
    except (OSError, KeyError, ValueError):
        moved = None
    return Counters(moved, cpu)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, as /proc lists every thread's children."""
    found: list[int] = []
    waiting = [pid]
    while waiting:
        current = waiting.pop()
        if current in found:
            continue
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as handle:
                    waiting.extend(int(child) for child in handle.read().split())
            except (OSError, ValueError):
                pass
    return found


def kill_group(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the process's group (it was started in a session of its own) if it still runs; whether
    it did."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
            return True
        except ProcessLookupError:
            pass
    return False


class Watchdog:
    """Watches `process` (started with start_new_session) from a thread of its own while the `with`
    block runs; kills its group after `timeout` seconds without progress and sets `stalled`. The
    caller reports every byte it reads from the process's pipes (`piped`) and every stderr line
    (`error_line`)."""

    def __init__(self, process: subprocess.Popen[bytes], timeout: float, poll: float = POLL_SECONDS) -> None:
        self.process = process
        self.timeout = timeout
        self.poll = poll
        self._piped = 0
        self._count_lock = threading.Lock()
        self._retrying_since: float | None = None
        self._finished = threading.Event()
        self._stalled = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="restic-watchdog", daemon=True)

    @property
    def stalled(self) -> bool:
        return self._stalled.is_set()

    def piped(self, count: int) -> None:
        """`count` bytes were read from the process's stdout or stderr."""
        with self._count_lock:
            self._piped += count

    def error_line(self, line: str) -> None:
        """A line of the process's stderr: a run of retries starts, goes on, or ends."""
        if RETRYING.search(line):
            if self._retrying_since is None:
                self._retrying_since = time.monotonic()
        else:
            self._retrying_since = None

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._finished.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        last_poll = last_progress = time.monotonic()
        previous: dict[int, Counters] = {}
        moved = 0  # bytes over the tree since the start, never lowered by a process that ends
        highest = 0
        measurable = True
        while not self._finished.wait(self.poll):
            now = time.monotonic()
            current = {pid: found for pid in process_tree(self.process.pid) if (found := counters(pid)) is not None}
            main = current.get(self.process.pid)
            if main is not None and main.moved is None:
                measurable = False
            busy = 0.0
            for pid, found in current.items():
                before = previous.get(pid, Counters(0, 0.0))
                moved += max(0, (found.moved or 0) - (before.moved or 0))
                busy += max(0.0, found.cpu - before.cpu)
            previous = current
            with self._count_lock:
                level = moved - self._piped
            if level > highest + SLACK_BYTES or busy >= BUSY_SHARE * (now - last_poll):
                highest, last_progress = max(highest, level), now
            last_poll = now
            retrying_since = self._retrying_since
            still = measurable and now - last_progress > self.timeout
            if still or (retrying_since is not None and now - retrying_since > self.timeout):
                if kill_group(self.process):  # (not when it has just ended of its own accord)
                    self._stalled.set()
                return
