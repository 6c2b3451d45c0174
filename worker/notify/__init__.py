"""Telling people: Apprise notifications (NOTIFY_URLS) and the dead-man's-switch ping (HEALTHCHECK_URL).

One message per event that needs someone (with NOTIFY_ON=all also the good news), the ping at a backup
run's start and end; delivered in the background, never raising into the caller nor holding it up for
longer than NOTIFY_TIMEOUT.

`events` (what each event says, and whether it is sent) → `transports` (Apprise, the ping, `notify test`)
→ `delivery` (background lanes, retries) → `scrub` (secrets out of everything sent); `urls` (checking,
showing and loading the URLs).
"""

from worker.notify.events import (
    backup_failed,
    backup_skipped,
    backup_started,
    backup_succeeded,
    backup_unchanged,
    drill_failed,
    drill_passed,
    left_refusing,
    repository_failed,
    uploads_missing,
    vault_failed,
    vault_pulled,
)
from worker.notify.transports import try_ping, try_urls

__all__ = [
    "backup_failed",
    "backup_skipped",
    "backup_started",
    "backup_succeeded",
    "backup_unchanged",
    "drill_failed",
    "drill_passed",
    "left_refusing",
    "repository_failed",
    "uploads_missing",
    "vault_failed",
    "vault_pulled",
    "try_ping",
    "try_urls",
]
