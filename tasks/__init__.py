"""Thin Celery tasks over the plain functions in `worker/`, with stable names `tma_backup.<step>`."""
