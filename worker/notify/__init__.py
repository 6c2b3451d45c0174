"""Telling people: Apprise notifications (NOTIFY_URLS) and the dead-man's-switch ping (HEALTHCHECK_URL)."""
