"""The status facts of several worker hosts as one answer, for `tma-backup status` through the broker.

Backups of one database may lie on several hosts (each chain runs where its kickoff was picked up), so
a host that merely has an older backup, or none, is not a problem by itself. Section by section:

- `backup` (and the `uploads` of that backup): from the host holding the newest complete backup;
- `drill`: from the host with the most recent drill record; with none anywhere, a host's problem (backups
  old enough that a drill should exist) wins over its warning;
- `repository` and `connections`: any host's problem wins (each host sends its own backups off site and
  could be asked to restore); else the newest set, or a host that could check.

A host that did not answer is a problem of its own. The result has the keys of `status_facts`, with
`host` replaced by `source` (`local` or `workers`) and `hosts`: each host's `answered`, and its own `ok`,
`problems` and `warnings` (or, unanswered, the reason as its one problem). When nobody could be asked at
all (no worker answered on the broker, the broker out of reach), `unanswered` gives the same keys, every
section null, and the reason as the one problem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.health.facts import SECTIONS, judged

Answer = dict[str, Any] | str  # a host's facts, or why it gave none


def combine(answers: dict[str, Answer], database: str, source: str, checked_at: str) -> dict[str, Any]:
    """One answer for `database` from every host's (all of the same database)."""
    facts = {host: answer for host, answer in answers.items() if isinstance(answer, dict)}
    silent = {host: answer for host, answer in answers.items() if isinstance(answer, str)}
    sections: dict[str, dict[str, Any] | None] = {name: None for name in SECTIONS}
    if facts:
        ordered = [facts[host] for host in sorted(facts)]
        newest_backup = _best(ordered, "backup", lambda section: (section["timestamp"] or "",))
        sections["backup"] = newest_backup["backup"]
        if newest_backup["backup"] is not None and newest_backup["backup"]["file"] is None and len(facts) > 1:
            sections["backup"] = {**newest_backup["backup"], "problem": (
                f"no complete backup of {newest_backup['database']!r} on any worker host ({', '.join(sorted(facts))})")}
        sections["uploads"] = newest_backup["uploads"]
        sections["drill"] = _best(ordered, "drill", lambda section: (
            section["at"] or "", section["problem"] is not None, section["warning"] is not None))["drill"]
        sections["repository"] = _best(ordered, "repository", lambda section: (
            section["problem"] is not None, section["timestamp"] or ""))["repository"]
        sections["connections"] = _best(ordered, "connections", lambda section: (
            section["problem"] is not None, section["checked"]))["connections"]
        sections["vault"] = _best(ordered, "vault", lambda section: (
            section["problem"] is not None, section["timestamp"] or ""))["vault"]
    verdict = judged(sections)
    verdict["problems"] += [f"{host}: {reason}" for host, reason in sorted(silent.items())]
    verdict["ok"] = not verdict["problems"]
    hosts: dict[str, dict[str, Any]] = {
        host: {"answered": True, **{key: answer[key] for key in ("ok", "problems", "warnings")}}
        for host, answer in facts.items()}
    hosts.update({host: {"answered": False, "ok": False, "problems": [reason], "warnings": []}
                  for host, reason in silent.items()})
    return {"database": database, "source": source, "checked_at": checked_at, **verdict,
            "hosts": dict(sorted(hosts.items())), **sections}


def unanswered(database: str, source: str, checked_at: str, reason: str) -> dict[str, Any]:
    """The answer when no host could be asked: the keys of `combine`'s answer, no host, every section
    null, `ok` false and `reason` (the CLI's `[ERROR]` line) as the one problem."""
    answer = combine({}, database, source, checked_at)
    answer.update(ok=False, problems=[reason])
    return answer


def _best(answers: list[dict[str, Any]], name: str, key: Callable[[dict[str, Any]], tuple[Any, ...]]) -> dict[str, Any]:
    """The answer whose section `name` ranks highest by `key` (the first such, in host order); answers
    without that section (a host with no repository configured) rank last."""
    best = answers[0]
    for answer in answers[1:]:
        if answer[name] is not None and (best[name] is None or key(answer[name]) > key(best[name])):
            best = answer
    return best
