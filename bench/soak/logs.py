"""What the product said it did, read from its own logs (bench/soak/__main__.py): every backup run's kickoff,
links and end, every drill, repair and repository maintenance, and beat's sends.

The workers' logs are the record that survives every fault (Redis, and with it the result backend, is
restarted empty by one of them). Celery logs each task's receipt, its success with its result's repr
and its failure with the exception; a kickoff's result names its links' task ids, so a failed link is
traced to its run. A run whose links stop without a word (its worker killed, its next message lost
with Redis) is `lost`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): (\w+)/([^\]]+)\] (.*)$")
TASK = re.compile(r"^Task (tma_backup\.\w+)\[([0-9a-f-]{36})\] (received|succeeded in ([\d.]+)s: (.*)|retry: (.*)|"
                  r"raised unexpected: (.*)|raised expected: (.*)|(.*))$")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BACKUP_PATH = re.compile(r"'backup': '([^']*_(\d{8}T\d{6}Z)\.dump(?:\.zst)?)'")
BEAT_SENT = "Sending due task nightly-backup (tma_backup.backup)"

# Why a run failed, from its error's text: the first pattern that matches names the cause.
CAUSES = (
    ("disk full", re.compile(r"No space left|ENOSPC|disk full|not enough free space", re.I)),
    ("lock lost", re.compile(r"lost the lock|lock .* (?:expired|taken)|LockLost", re.I)),
    ("repository unreachable", re.compile(r"repository|restic|s3:|connection refused.*9\d\d\d|stall", re.I)),
    ("database unavailable", re.compile(r"terminating connection|connection refused|starting up|shutting down|"
                                        r"server closed the connection|ServerUnavailable|could not connect|"
                                        r"connection to server|the database system", re.I)),
    ("broker unavailable", re.compile(r"redis|broker|ConnectionError", re.I)),
)


def cause_of(error: str) -> str:
    for name, pattern in CAUSES:
        if pattern.search(error):
            return name
    return "other"


def moment(stamp: str, millis: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000


@dataclass
class TaskEvent:
    at: float
    name: str  # tma_backup.<step>
    task_id: str
    kind: str  # received, succeeded, retry, failed
    text: str  # the result's repr or the error
    source: str  # the log it came from


@dataclass
class Run:
    """One scheduled backup as its kickoff and links reported it."""

    run_id: str
    host: str
    received_at: float
    kickoff_at: float | None = None
    timestamp: str | None = None  # the backup's (the set's `at:` tag)
    steps: dict[str, str] = field(default_factory=dict)  # link task id → link name
    outcome: str = "lost"  # good, failed, skipped, lost
    cause: str = ""  # why it failed or was skipped, or "no outcome"
    error: str = ""
    ended_at: float | None = None
    dump_done: float | None = None  # the dump link's end: its snapshot was taken before
    retries: int = 0

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": self.host, "received_at": round(self.received_at, 1),
                "timestamp": self.timestamp, "outcome": self.outcome, "cause": self.cause,
                "error": self.error[:300], "ended_at": round(self.ended_at, 1) if self.ended_at else None,
                "retries": self.retries}


def task_events(path: Path, source: str) -> list[TaskEvent]:
    events: list[TaskEvent] = []
    if not path.exists():
        return events
    for raw in path.read_text(errors="replace").splitlines():
        line = LINE.match(raw)
        if not line:
            continue
        task = TASK.match(line.group(5))
        if not task:
            continue
        at = moment(line.group(1), line.group(2))
        name, task_id, what = task.group(1), task.group(2), task.group(3)
        if what == "received":
            events.append(TaskEvent(at, name, task_id, "received", "", source))
        elif task.group(5) is not None:
            events.append(TaskEvent(at, name, task_id, "succeeded", task.group(5), source))
        elif task.group(6) is not None:
            events.append(TaskEvent(at, name, task_id, "retry", task.group(6), source))
        elif task.group(7) is not None or task.group(8) is not None:
            events.append(TaskEvent(at, name, task_id, "failed", task.group(7) or task.group(8) or "", source))
        elif line.group(3) in ("ERROR", "CRITICAL"):
            events.append(TaskEvent(at, name, task_id, "failed", task.group(9) or "", source))
    return events


def beat_sends(path: Path) -> list[float]:
    sends = []
    if path.exists():
        for raw in path.read_text(errors="replace").splitlines():
            line = LINE.match(raw)
            if line and BEAT_SENT in line.group(5):
                sends.append(moment(line.group(1), line.group(2)))
    return sends


def runs(events: list[TaskEvent]) -> list[Run]:
    """Every scheduled backup a worker received, with what became of it."""
    found: dict[str, Run] = {}
    by_step: dict[str, Run] = {}
    for event in sorted(events, key=lambda item: item.at):
        if event.name == "tma_backup.backup":
            if event.kind == "received":
                found.setdefault(event.task_id, Run(event.task_id, event.source, event.at))
                continue
            run = found.setdefault(event.task_id, Run(event.task_id, event.source, event.at))
            run.kickoff_at = event.at
            if event.kind == "succeeded":
                if event.text.startswith("{'skipped'"):
                    run.outcome, run.ended_at = "skipped", event.at
                    run.cause = "slot already taken" if "already started" in event.text else "database busy"
                    run.error = event.text
                    continue
                if event.text.startswith("{'unchanged'"):  # frequent sets: nothing changed, no set made
                    run.outcome, run.ended_at, run.cause = "unchanged", event.at, "nothing changed"
                    continue
                path = BACKUP_PATH.search(event.text)
                run.timestamp = path.group(2) if path else None
                steps = re.search(r"'steps': \[([^\]]*)\]", event.text)
                names = re.search(r"'step_names': \[([^\]]*)\]", event.text)
                ids = UUID.findall(steps.group(1)) if steps else []
                labels = re.findall(r"'(\w+)'", names.group(1)) if names else []
                for number, step in enumerate(ids):
                    run.steps[step] = labels[number] if number < len(labels) else f"link{number}"
                    by_step[step] = run
                run.cause = "no outcome"
            elif event.kind == "failed":
                run.outcome, run.ended_at, run.error = "failed", event.at, event.text
                run.cause = "start: " + cause_of(event.text)
            continue
        linked = by_step.get(event.task_id)
        if linked is None:
            continue
        run = linked
        if event.kind == "retry":
            run.retries += 1
        elif event.kind == "failed" and run.outcome not in ("good", "failed"):
            link = event.name.removeprefix("tma_backup.")
            run.outcome, run.ended_at, run.error = "failed", event.at, event.text
            run.cause = f"{cause_of(event.text)}"
            run.error = f"{link}: {event.text}"
        elif event.kind == "succeeded" and event.name == "tma_backup.dump":
            run.dump_done = event.at
        elif event.kind == "succeeded" and event.name == "tma_backup.prune":
            run.outcome, run.ended_at, run.cause = "good", event.at, ""
            path = BACKUP_PATH.search(event.text)
            if path:
                run.timestamp = path.group(2)
    return sorted(found.values(), key=lambda run: run.received_at)


@dataclass
class Activity:
    """Drills, repairs and maintenance: how many ran and how each ended."""

    name: str
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"succeeded": self.succeeded, "failed": self.failed, "skipped": self.skipped,
                "errors": sorted(set(self.errors))[:12]}


def activities(events: list[TaskEvent]) -> dict[str, Activity]:
    found: dict[str, Activity] = {}
    for event in events:
        if event.name not in ("tma_backup.drill", "tma_backup.repair", "tma_backup.repository_maintenance",
                              "tma_backup.restore", "tma_backup.rollback", "tma_backup.fetch"):
            continue
        item = found.setdefault(event.name.removeprefix("tma_backup."), Activity(event.name))
        if event.kind == "succeeded":
            if event.text.startswith("{'skipped'"):
                item.skipped += 1
            elif "'passed': False" in event.text or "'ok': False" in event.text:
                item.failed += 1
                item.errors.append(event.text[:200])
            else:
                item.succeeded += 1
        elif event.kind == "failed":
            item.failed += 1
            item.errors.append(event.text[:200])
    return found
