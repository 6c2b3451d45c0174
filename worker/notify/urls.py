"""Checking NOTIFY_URLS and HEALTHCHECK_URL at start-up (placeholder: the notifications work fills it in)."""

from __future__ import annotations


def check_notify_urls(value: str) -> None:
    """Raise ValueError when NOTIFY_URLS holds something Apprise cannot use."""


def check_healthcheck_url(value: str) -> None:
    """Raise ValueError when HEALTHCHECK_URL is not an http(s) URL."""
