"""NOTIFY_URLS and HEALTHCHECK_URL: split, checked at start-up, and shown without their secrets.

Both settings carry secrets (a webhook's token, a bot's key, a check's UUID): no function here puts a
URL, or any part of one that may be a secret, into an error message. A URL is shown as its service and
scheme, plus its host when that is a real host name or address (`json://127.0.0.1:8080/…`); a token
that stands where a host would (`tgram://<bot token>/…`, `discord://<id>/<token>`) never is.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:  # apprise loads ~200 service plugins: only when NOTIFY_URLS is set
    import apprise

_SCHEME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9+.-]{0,31})://")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", re.IGNORECASE)


def quiet_apprise() -> None:
    """Apprise logs an unusable URL verbatim ("Unparseable URL slack://<token>") and, at debug level, the
    payloads: its logger never reaches ours (a worker's log, the CLI's stderr). Failures are reported by
    `worker.notify` itself, in lines built from safe fields."""
    logger = logging.getLogger("apprise")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


def split_urls(value: str) -> list[str]:
    """The entries of NOTIFY_URLS, in order: separated by white space, and by commas where the next
    entry starts with a scheme (a comma inside a URL, as in `mailto://…?to=a@x,b@y`, stays)."""
    from apprise.utils.parse import parse_urls

    split = cast(Callable[[str], list[str]], parse_urls)  # untyped in Apprise
    entries: list[str] = []
    for word in value.split():
        entries += [str(entry) for entry in split(word) if str(entry).strip(",;")]
    return entries


def scheme_of(url: str) -> str | None:
    """The URL's scheme (lower case) when it has a plausible one, else None."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def instantiate(url: str) -> apprise.Apprise | None:
    """An Apprise object holding this one URL, or None when Apprise cannot use it."""
    import apprise

    quiet_apprise()
    notifier = apprise.Apprise()
    try:
        return notifier if notifier.add(url) else None
    except Exception:  # a plugin that chokes on a malformed URL instead of refusing it
        return None


def check_notify_urls(value: str) -> None:
    """Raise ValueError when NOTIFY_URLS holds something Apprise cannot use; the message numbers the
    entry and names its scheme, never the URL itself."""
    entries = split_urls(value)
    if not entries:
        raise ValueError("holds no URL: give one or more Apprise URLs, separated by commas or spaces")
    for number, url in enumerate(entries, start=1):
        scheme = scheme_of(url)
        if scheme is None:
            raise ValueError(f"entry {number} is not a URL Apprise can use (no scheme://; e.g. "
                             "json://host/path, mailto://user:password@host, tgram://bottoken/chat)")
        if instantiate(url) is None:
            why = ("a service Apprise does not know" if known_scheme(scheme) is False
                   else "not in the form that service needs: see its page in the Apprise wiki")
            raise ValueError(f"entry {number} is not a URL Apprise can use (scheme '{scheme}': {why})")


def known_scheme(scheme: str) -> bool | None:
    """Whether Apprise has a service for `scheme` (None: this Apprise cannot say)."""
    try:
        from apprise.manager_plugins import NotificationManager

        manager = cast(Callable[[], Any], NotificationManager)()  # untyped in Apprise
        return scheme in manager.schemas()
    except Exception:
        return None


def check_healthcheck_url(value: str) -> None:
    """Raise ValueError when HEALTHCHECK_URL is not an http(s) URL with a host."""
    value = value.strip()
    expected = "must be an http:// or https:// URL with a host (the check's ping URL, e.g. https://hc-ping.com/<uuid>)"
    if not value.isprintable() or any(char.isspace() for char in value):
        raise ValueError(f"{expected}, without spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ValueError(expected)


def shown_host(host: str | None, port: int | None = None) -> str | None:
    """`host[:port]` when `host` is an IP address, `localhost` or a dotted host name; None when it may
    be a token standing where a host would."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host.lower() != "localhost" and not _HOST_NAME.match(host):
            return None
    return f"{host}:{port}" if port else host


def describe(url: str, number: int | None = None) -> str:
    """How a NOTIFY_URLS entry is shown: `entry 2: Slack (slack://…)`, `entry 1: JSON (json://127.0.0.1:8080/…)`."""
    scheme = scheme_of(url) or "?"
    service = scheme
    host: str | None = None
    notifier = instantiate(url)
    if notifier is not None:
        for plugin in notifier:
            service = str(getattr(plugin, "service_name", scheme))
            raw_port = getattr(plugin, "port", None)
            host = shown_host(getattr(plugin, "host", None), raw_port if isinstance(raw_port, int) else None)
    where = f"{scheme}://{host}/…" if host else f"{scheme}://…"
    prefix = f"entry {number}: " if number is not None else ""
    return f"{prefix}{service} ({where})"


def describe_healthcheck(url: str) -> str:
    """HEALTHCHECK_URL as shown: `https://hc-ping.com/…` (the check's UUID is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{shown_host(parts.hostname, parts.port) or '…'}/…"


def secret_parts(url: str) -> list[str]:
    """Pieces of a URL that may be secrets, for scrubbing them out of any text: the URL itself, its user
    name and password, and every part of its address, path and query that looks like a token (eight
    characters or more with a digit, or sixteen or more; not words like `notify` or `hooks`)."""
    found = [url]
    try:
        split = urlsplit(url)
        found += [piece for piece in (split.username, split.password) if piece]
        pieces = re.split(r"[/:@]", split.netloc) + split.path.split("/")
        pieces += [pair.partition("=")[2] for pair in split.query.split("&")]
    except ValueError:
        pieces = []
    found += [piece for piece in pieces if not shown_host(piece)
              and (len(piece) >= 16 or (len(piece) >= 8 and any(char.isdigit() for char in piece)))]
    return list(dict.fromkeys(found))
