"""Celery configuration, read from the validated settings. JSON only, or signed task messages with the
TASK_SIGNING_* settings (`worker.coordination.signing`); events on; nothing retried blindly."""

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

broker_url = _settings.local_redis_url
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

if _settings.signing:
    # Signed task messages: tasks and control messages signed with TASK_SIGNING_KEY, only those signed by a
    # certificate in TASK_SIGNING_CERT_STORE accepted; results and events stay JSON. The files are checked
    # here, once, as Celery will read them; `setup_security` registers the `auth` serializer in every process
    # that loads this configuration (workers, beat, Flower, the CLI), right after Celery has loaded it.
    from worker.celery_app import app as _app
    from worker.coordination import signing as _signing

    try:
        _warnings = _signing.check(_settings)
    except _SettingsError as _error:
        print(f"[ERROR] {_error}", file=_sys.stderr)
        raise SystemExit(2) from None
    for _warning in _warnings:
        print(f"[WARN] {_warning}", file=_sys.stderr)
    globals().update(_signing.celery_settings(_settings))  # task_serializer, accept_content, security_*, …
    _app.on_after_configure.connect(_signing.setup_security, weak=False, dispatch_uid="tma_backup.signing")

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
