"""Progress of a running task, for the CLI that follows it (result backend) and for Flower (events)."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from worker.archive.meta import human_size
from worker.progress import Progress

logger = get_task_logger(__name__)


def progress_reporter(task: Task, with_fields: bool = True) -> Progress:
    """Report each phase (and, `with_fields`, its fields such as bytes written) as the task's PROGRESS
    state and as a `task-progress` event. Best effort: a report that cannot reach Redis (a restart, a
    blip) is dropped with one warning; it never fails the work it describes."""
    warned = False

    def report(phase: str, fields: dict[str, Any]) -> None:
        nonlocal warned
        shown_fields = fields if with_fields else {}
        shown = f"{phase}: {human_size(shown_fields['bytes'])}B" if "bytes" in shown_fields else phase
        try:
            task.update_state(state="PROGRESS", meta={"phase": phase, **shown_fields})
            task.send_event("task-progress", result=shown, phase=phase, **shown_fields)
        except Exception as error:  # kombu and redis raise several connection error types
            if not warned:
                warned = True
                logger.warning("progress of %s not reported (%s); the work goes on", task.name, error)

    return report
