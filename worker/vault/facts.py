"""What `tma-backup status` says on a vault's host: the `vault` section of the status facts.

Keys: `address`, `primary` (both without passwords), `sets` (how many the vault holds), `timestamp` and
`age_hours` (its newest set), `max_age_hours` (BACKUP_MAX_AGE_HOURS), `last_pull` (`at`, `ok`, `error`,
`copied`, `primary_sets`), `alarms` (not yet acknowledged: `kind`, `since`, `message`, `sets`), `error`.
Problem: an alarm; the last pull failed or found the primary unwell; no pull yet; the vault cannot be
read, holds no set, or its newest set is older than BACKUP_MAX_AGE_HOURS."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from worker.archive import catalogue
from worker.errors import BackupError
from worker.repository.access import vault_access
from worker.repository.restic import Restic, redacted
from worker.repository.sets import merge_parts
from worker.settings import Settings
from worker.vault import watch
from worker.vault.pull import parts_of


def vault_section(settings: Settings, now: datetime) -> dict[str, Any]:
    state = watch.State.load(settings)
    section: dict[str, Any] = {
        "address": redacted(settings.vault or ""), "primary": redacted(settings.repository or ""), "sets": None,
        "timestamp": None, "age_hours": None, "max_age_hours": settings.BACKUP_MAX_AGE_HOURS,
        "last_pull": state.last_pull or None, "alarms": state.alarms, "error": None, "problem": None, "warning": None,
    }
    problems = watch.active(state)
    if not state.last_pull:
        problems.append("the vault has not pulled yet: run `tma-backup vault pull` (beat pulls at VAULT_SCHEDULE)")
    try:
        sets = merge_parts(parts_of(Restic(settings, vault_access(settings))))
    except BackupError as error:
        section["error"] = str(error)
        problems.append(f"the vault cannot be read: {error}")
        sets = None
    if sets is not None:
        section["sets"] = len(sets)
        if not sets:
            problems.append(f"the vault {section['address']} holds no set")
        else:
            newest = max(item.timestamp for item in sets)
            age = round((now - catalogue.parse_timestamp(newest)).total_seconds() / 3600, 2)
            section.update(timestamp=newest, age_hours=age)
            if age > settings.BACKUP_MAX_AGE_HOURS:
                problems.append(f"the vault's newest set is {age:.1f} h old, over BACKUP_MAX_AGE_HOURS="
                                f"{settings.BACKUP_MAX_AGE_HOURS:g}")
    if problems:
        section["problem"] = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
    return section
