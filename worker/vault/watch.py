"""What the vault remembers of the primary, and what it takes for a sign of a compromise.

The state (`BACKUP_DIR/vault-state.json` on the vault's host) holds, per group (a server's database):
the sets seen in the primary and the sets copied. Each pull compares the primary's listing with it:

- **vanished**: a set the primary's own retention would have kept is gone. restic's calendar rules
  always keep the newest set, and the newest set of each of the `REPOSITORY_KEEP_DAILY` most recent days
  that have sets (set it as on the TMA host); those are *expected*. A set the rules drop (an older set of
  a day, a day beyond the window) vanishing is normal retention and raises nothing.
- **back-dated**: a set the vault has not seen, dated before the newest set the vault holds of its
  group: what a compromised client adds to evict real sets under count rules. Not copied.
- **future-dated**: a set dated more than `FUTURE_SLACK` ahead of the vault's clock (restic's
  `--keep-within` counts back from a group's newest set: one dated next year would make every real set
  "old"). Not copied.
- **stale**: the primary's newest set of a group is older than BACKUP_MAX_AGE_HOURS.
- **unreadable**: the primary cannot be read (the password or the key no longer work, the address is
  gone), recorded by the pull.

The first three are *alarms*: they stay until the operator acknowledges them (`tma-backup vault
acknowledge`), whatever happens next; the last two are problems while they last. The vault's own
retention is time-based only (`worker.vault.keep`), so sets that slipped in with false dates could not
evict real ones there even if they were copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from worker.archive import catalogue
from worker.archive.meta import write_atomically
from worker.errors import BackupError
from worker.repository.sets import UPLOADS_PART, RepositorySet
from worker.settings import Settings

STATE_NAME = "vault-state.json"
FUTURE_SLACK = timedelta(hours=1)
Key = tuple[str | None, str, str]  # server, database, timestamp


def group_name(server: str | None, database: str) -> str:
    return f"{server or '-'}|{database}"


@dataclass
class State:
    """The vault's memory of the primary; JSON in BACKUP_DIR."""

    seen: dict[str, dict[str, str]] = field(default_factory=dict)  # group → {timestamp: id when first seen}
    copied: dict[str, list[str]] = field(default_factory=dict)  # group → timestamps copied into the vault
    alarms: list[dict[str, Any]] = field(default_factory=list)  # {kind, since, message, sets}
    problems: list[dict[str, Any]] = field(default_factory=list)  # live: {kind, since, message}
    last_pull: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path(settings: Settings) -> Path:
        return settings.backup_dir / STATE_NAME

    @classmethod
    def load(cls, settings: Settings) -> State:
        try:
            body = json.loads(cls.path(settings).read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as error:
            raise BackupError(f"the vault's state {cls.path(settings)} is unreadable ({error}); move it away to "
                              "start afresh (the next pull copies what the vault lacks)") from None
        return cls(**{key: body[key] for key in ("seen", "copied", "alarms", "problems", "last_pull") if key in body})

    def save(self, settings: Settings) -> None:
        os.makedirs(settings.backup_dir, mode=0o700, exist_ok=True)
        write_atomically(self.path(settings), json.dumps(self.__dict__, indent=1, sort_keys=True))

    def raise_alarm(self, kind: str, message: str, sets: list[str], now: datetime) -> dict[str, Any]:
        alarm = {"kind": kind, "since": catalogue.utc_timestamp(now), "message": message, "sets": sets}
        self.alarms.append(alarm)
        return alarm


@dataclass
class Assessment:
    """One pull's reading of the primary: what to copy (oldest first, each a set's parts) and what is wrong."""

    to_copy: list[list[RepositorySet]]
    new_alarms: list[dict[str, Any]]
    problems: list[dict[str, Any]]


def _moment(item: RepositorySet) -> datetime:
    """The later of a set's snapshot time and its backup timestamp: neither may run ahead or back."""
    stamped = catalogue.parse_timestamp(item.timestamp)
    return max(stamped, item.time) if item.time.year > 1970 else stamped


def _by_group(parts: list[RepositorySet]) -> dict[str, dict[str, list[RepositorySet]]]:
    """group → timestamp → that set's parts (database part first)."""
    groups: dict[str, dict[str, list[RepositorySet]]] = {}
    for part in sorted(parts, key=lambda item: item.part == UPLOADS_PART):
        groups.setdefault(group_name(part.server, part.database), {}).setdefault(part.timestamp, []).append(part)
    return groups


def expected(seen: dict[str, str], keep_daily: int) -> set[str]:
    """The timestamps the primary's retention keeps of those seen: the newest, and the newest of each of
    the `keep_daily` most recent days that have sets."""
    if not seen:
        return set()
    newest_of_day: dict[str, str] = {}
    for timestamp in seen:
        day = timestamp[:8]
        newest_of_day[day] = max(newest_of_day.get(day, ""), timestamp)
    days = sorted(newest_of_day)[-keep_daily:] if keep_daily else []
    return {max(seen), *(newest_of_day[day] for day in days)}


def assess(state: State, primary: list[RepositorySet], vault: list[RepositorySet], settings: Settings,
           now: datetime) -> Assessment:
    """Compare the primary's parts with the state and the vault's parts; update the state's memory."""
    in_primary, in_vault = _by_group(primary), _by_group(vault)
    to_copy: list[list[RepositorySet]] = []
    new_alarms: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for group in sorted(set(in_primary) | set(state.seen)):
        sets, held = in_primary.get(group, {}), in_vault.get(group, {})
        seen = state.seen.setdefault(group, {})
        copied = set(state.copied.get(group, []))
        newest_held = max(held, default="")
        suspects: dict[str, list[str]] = {"future-dated": [], "back-dated": []}
        for timestamp, parts in sorted(sets.items()):
            if timestamp in seen or timestamp in copied:
                continue
            if max(_moment(part) for part in parts) > now + FUTURE_SLACK:
                suspects["future-dated"].append(timestamp)
            elif timestamp < newest_held:
                suspects["back-dated"].append(timestamp)
            else:
                seen[timestamp] = parts[0].id
        # Judged with the new sets in: the primary's retention made room for them.
        gone = sorted(expected(seen, settings.REPOSITORY_KEEP_DAILY) - set(sets))
        if gone:
            new_alarms.append(state.raise_alarm(
                "vanished", f"{len(gone)} set(s) of {group} that the primary's retention keeps vanished from it: "
                f"{', '.join(gone[:5])}", gone, now))
        for kind, names in suspects.items():
            if names:
                new_alarms.append(state.raise_alarm(
                    kind, f"{len(names)} {kind} set(s) of {group} appeared in the primary (not copied): "
                    f"{', '.join(names[:5])}", names, now))
        legit = [timestamp for timestamp in sets if timestamp in seen]
        for timestamp in legit:  # the parts the vault lacks; never again a set its own retention forgot
            missing = [part for part in sets[timestamp]
                       if part.part not in {held_part.part for held_part in held.get(timestamp, [])}]
            if missing and (timestamp not in copied or timestamp in held):
                to_copy.append(missing)
        if legit:
            age = (now - catalogue.parse_timestamp(max(legit))).total_seconds() / 3600
            if age > settings.BACKUP_MAX_AGE_HOURS:
                problems.append({"kind": "stale", "message": f"the primary's newest set of {group} is {age:.1f} h "
                                 f"old, over BACKUP_MAX_AGE_HOURS={settings.BACKUP_MAX_AGE_HOURS:g}"})
        # Remembered: what the primary's retention keeps and what it holds now; the vanished are told once.
        keep = (expected(seen, settings.REPOSITORY_KEEP_DAILY) | set(sets)) - set(gone)
        state.seen[group] = {timestamp: ident for timestamp, ident in seen.items() if timestamp in keep}
        state.copied[group] = sorted(timestamp for timestamp in copied if not sets or timestamp >= min(sets))
    to_copy.sort(key=lambda parts: (parts[0].timestamp, parts[0].database, parts[0].server or ""))
    return Assessment(to_copy, new_alarms, problems)


def record_copied(state: State, parts: list[RepositorySet]) -> None:
    group = group_name(parts[0].server, parts[0].database)
    copied = state.copied.setdefault(group, [])
    if parts[0].timestamp not in copied:
        copied.append(parts[0].timestamp)
        copied.sort()


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def active(state: State) -> list[str]:
    """What is wrong now: the alarms not yet acknowledged, then the problems of the last pull."""
    return [str(alarm["message"]) for alarm in state.alarms] + [str(problem["message"]) for problem in state.problems]


def acknowledge(settings: Settings) -> list[dict[str, Any]]:
    """Clear the alarms (the operator has looked); returns them. The problems clear themselves."""
    state = State.load(settings)
    cleared, state.alarms = state.alarms, []
    state.save(settings)
    return cleared
