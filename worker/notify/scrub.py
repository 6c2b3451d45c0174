"""Secrets out of what is sent: every secret setting's value, and the secret parts of the URLs, replaced by
`***` in every message, ping body and warning line, as a last line of defence (what is sent is built
from safe fields only)."""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.notify.urls import secret_parts, split_urls
from worker.settings import SECRET_SETTINGS, Settings

# A secret shorter than this is not scrubbed (it would mangle ordinary words); the settings' secrets
# are all far longer in any real set-up.
MIN_SCRUBBED = 4


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value these settings hold, longest first: the SECRET_SETTINGS (passwords, keys,
    tokens, the notification URLs themselves and their parts), the repository's password file, and a
    password inside the repository's or the broker's address."""
    found: list[str] = []
    for name in SECRET_SETTINGS:
        value = getattr(settings, name, None)
        if value is None:
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        found.append(text)
        if name == "NOTIFY_URLS":
            for url in text.split() + split_urls(text):
                found += secret_parts(url)
        elif name == "HEALTHCHECK_URL":
            found += secret_parts(text)
    password_file = getattr(settings, "BACKUP_REPOSITORY_PASSWORD_FILE", None)
    if password_file is not None:
        try:
            found += password_file.read_text().splitlines()[:1]
        except (OSError, UnicodeDecodeError):
            pass
    for address in (settings.BACKUP_REPOSITORY, settings.CELERY_BROKER_URL, settings.CELERY_RESULT_BACKEND):
        if address:
            try:
                password = urlsplit(address.split(":", 1)[1] if address.startswith(("s3:", "rest:")) else address).password
            except ValueError:
                password = None
            if password:
                found.append(password)
    unique = {value.strip() for value in found if len(value.strip()) >= MIN_SCRUBBED}
    return sorted(unique, key=len, reverse=True)


def scrub(text: str, settings: Settings) -> str:
    """`text` with every secret of `settings` replaced by `***`."""
    for secret in secrets_of(settings):
        text = text.replace(secret, "***")
    return text


def scrub_text(text: str) -> str:
    """Scrub with the process's settings when they can be read (they were, for anything to be sent)."""
    try:
        from worker.settings import get_settings

        return scrub(text, get_settings())
    except Exception:
        return text
