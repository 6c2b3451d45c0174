"""tma-backup's worker package: the one Celery app (`celery -A worker worker -E`) and the plain
functions its tasks call."""

from worker.celery_app import app

__all__ = ["app"]
