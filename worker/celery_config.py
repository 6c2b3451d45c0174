"""Celery configuration, read from the validated settings. JSON only; events on; nothing retried blindly."""

# Every module-level name here becomes a Celery setting (shown by `celery inspect conf` and on Flower's
# worker page): helpers are imported under private names so that only real settings are public.
import sys as _sys

from worker.settings import SettingsError as _SettingsError
from worker.settings import get_settings as _get_settings

try:
    _settings = _get_settings()
except _SettingsError as _error:  # a worker, beat or Flower started with bad settings: one line, exit 2
    print(f"[ERROR] {_error}", file=_sys.stderr)
    raise SystemExit(2) from None

broker_url = _settings.broker_url or "redis://127.0.0.1:6379/0"
result_backend = _settings.result_backend or broker_url
broker_connection_retry_on_startup = True
broker_transport_options = {"visibility_timeout": 12 * 3600}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}
result_expires = 7 * 24 * 3600
# Off: an extended result stores the task's real arguments, and a restore's token is one.
result_extended = False

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

task_default_queue = "tma_backup"
task_track_started = True
task_send_sent_event = True
worker_send_task_events = True
task_acks_late = False
worker_prefetch_multiplier = 1
timezone = "UTC"
enable_utc = True

from beat_schedule import build_schedule as _build_schedule  # noqa: E402  (needs the settings above)

beat_schedule = _build_schedule(_settings)
