"""tma-backup's worker package: the one Celery app (`celery -A worker worker -E`) and the plain
functions its tasks call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.celery_app import app

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # The app (and Celery) is imported on first use: `celery -A worker` and the tasks ask for it, while a
    # CLI command that never talks to a broker (list, verify, a local status) does not pay for Celery.
    if name == "app":
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
