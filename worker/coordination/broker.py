"""Who may send tasks: a worker whose broker has no password and is reachable beyond this machine says so.

Whoever can write to the broker can send tasks, restores and rollbacks included. A worker started with a
`CELERY_BROKER_URL` that has no password and whose host is not a loopback address prints one `[WARN]`
line on stderr at start-up (`celeryd_init`: the worker command's first signal, before it connects).
The decision is a pure function of the URL (`broker_exposure_warning`); no name is ever resolved, so a
name that happens to resolve to loopback counts as not on loopback. The password is never printed: the
URL is shown through kombu's `maybe_sanitize_url`, and a URL it cannot parse only by scheme and host."""

from __future__ import annotations

import ipaddress
import sys
from typing import Any
from urllib.parse import SplitResult, urlsplit

from celery.signals import celeryd_init
from kombu.utils.url import maybe_sanitize_url

# Schemes that never leave the machine: a Unix socket, or no network at all.
_LOCAL_SCHEMES = frozenset({"unix", "socket", "redis+socket", "memory", "filesystem"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z), `localhost`, or no host at all (the client's default,
    localhost). A name is never resolved: only these literals count."""
    if not host:
        return True
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _exposed(part: SplitResult) -> bool:
    """One URL of the list: on the network (not a socket, not loopback) and without a password."""
    if part.scheme.lower() in _LOCAL_SCHEMES:
        return False
    if is_loopback_host(part.hostname):
        return False
    return not part.password  # None (no password) or "" (`user:@host`) alike


def display_url(url: str) -> str:
    """The URL as it may be printed: password masked (`**`), query dropped (it may hold a password);
    each URL of a `;`-separated failover list alike."""
    shown = []
    for piece in (piece.strip() for piece in url.split(";")):
        if not piece:
            continue
        try:
            shown.append(str(maybe_sanitize_url(piece)))
        except ValueError:  # a port that is not a number, a broken IPv6 literal: scheme and host only
            scheme, _, rest = piece.partition("://")
            host = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
            shown.append(f"{scheme}://{host}/…")
    return ";".join(shown)


def broker_exposure_warning(url: str | None) -> str | None:
    """The warning (without its `[WARN]` label) for a broker URL that has no password and is not on
    loopback, else None. Handles `redis://` and `rediss://` (and any scheme with a host), Unix sockets
    (`unix://`, `redis+socket://`: fine), a missing host (the client's default, localhost: fine) and
    kombu's `;`-separated failover lists (a warning when any of them is exposed). A URL that does not
    parse gets no warning: Celery refuses it itself, loudly."""
    if not url or not url.strip():
        return None
    try:
        parts = [urlsplit(piece.strip()) for piece in url.split(";") if piece.strip()]
        exposed = any(_exposed(part) for part in parts)
    except ValueError:  # e.g. "Invalid IPv6 URL"
        return None
    if not exposed:
        return None
    return (f"CELERY_BROKER_URL {display_url(url)} has no password and is not on loopback: anyone who "
            "reaches it can run backups, restores and rollbacks of every database this worker serves; "
            "set a password (redis://:PASSWORD@host) and TLS (rediss://)")


@celeryd_init.connect
def _warn_about_an_open_broker(sender: Any = None, conf: Any = None, **kwargs: Any) -> None:
    """`celery worker` only (beat and Flower do not send this signal), in its main process, once."""
    url = getattr(conf, "broker_url", None)
    message = broker_exposure_warning(url) if isinstance(url, str) else None
    if message:
        print(f"[WARN] {message}", file=sys.stderr, flush=True)
