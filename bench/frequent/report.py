"""frequent.md: the figures beside issue 24's goal."""

from __future__ import annotations

import json
from typing import Any


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def markdown(results: dict[str, Any]) -> str:
    medians, ratios, figures, measured_ = results["medians"], results["ratios"], results["figures"], results["measured"]
    bare_of = {"unchanged run": "bare set, nothing changed", "changed run": "bare set, after activity"}
    lines = [
        "# Frequent sets (issue 24): what a 15-minute cadence costs",
        "",
        f"Measured {measured_['started']} – {measured_['finished']} on {measured_['host']} ({measured_['cpus']} CPUs), "
        f"code {measured_['code']}, {measured_['restic']}; medians of {measured_['runs']} run(s). "
        f"TMA Cloud{' (the reference set: bench.run’s 1.2 GB database, every files row with its upload)' if results['data'].get('reference') else ''}: "
        f"{results['data']['rows']} rows, database {_bytes(results['data'].get('database_bytes'))} on disk, "
        f"{results['data']['uploads']} uploads ({_bytes(results['data']['uploads_bytes'])}); "
        f"`BACKUP_SCHEDULE=\"{figures['schedule']}\"`, BACKUP_COMPRESSION: {results.get('compression')}; "
        "the CLI in-process (no broker), a local restic repository.",
        "",
        "| measurement | wall s | CPU s | PostgreSQL CPU s (sampled) | bytes sent | wall vs bare | CPU vs bare |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first = next((item for item in results["measurements"] if item["step"] == "first whole set"), None)
    if first is not None:
        lines.append(f"| first whole set (once, not a median) | {_number(first['wall_seconds'])} | "
                     f"{_number(first['cpu_seconds'])} | {_number(first['server_cpu_seconds'])} | "
                     f"{_bytes(first['repository_bytes_added'])} | | |")
    for step in ("unchanged run", "changed run", "bare set, nothing changed", "bare set, after activity", "bare pg_dump -Fc"):
        row = medians[step]
        ratio = ratios.get(f"{step} vs {bare_of[step]}") if step in bare_of else None
        title = {"unchanged run": "a. `backup --if-changed`, nothing changed",
                 "changed run": "b. `backup --if-changed`, after a typical 15 minutes",
                 "bare set, nothing changed": "c. bare `pg_dump -Fc` + `restic backup` ×2, nothing changed",
                 "bare set, after activity": "c. bare `pg_dump -Fc` + `restic backup` ×2, after the activity",
                 "bare pg_dump -Fc": "c. bare `pg_dump -Fc` alone"}[step]
        lines.append(f"| {title} | {_number(row['wall_seconds'])} | {_number(row['cpu_seconds'])} | "
                     f"{_number(row['server_cpu_seconds'])} | {_bytes(row['repository_bytes_added'])} | "
                     f"{_number(ratio and ratio['wall_seconds'], 3)} | {_number(ratio and ratio['cpu_seconds'], 3)} |")
    startup = next((item for item in results["measurements"] if item["step"].startswith("CLI start-up")), None)
    if startup is not None:
        lines.append(f"| context: the CLI's start-up alone (`tma-backup --help`) | {_number(startup['wall_seconds'])} | "
                     f"{_number(startup['cpu_seconds'])} | | | | |")
    floor = medians["restic snapshots"]
    lines.append(f"| context: one restic command (`restic snapshots --json` of the repository) | "
                 f"{_number(floor['wall_seconds'])} | {_number(floor['cpu_seconds'])} | | | | |")
    goal = _percent(figures["goal_share_of_one_core"])
    lines += [
        "",
        "CPU: the CLI and every tool it ran (`os.wait4`); PostgreSQL: its backends serving the run, sampled from /proc "
        "every 20 ms (a lower bound). Bytes sent: what the repository folder grew by.",
        "",
        "| derived | value | goal |",
        "| --- | --- | --- |",
        f"| share of one core, every 15-minute run unchanged | {_percent(figures['share_of_one_core_every_run_unchanged'])}"
        f" (with PostgreSQL's: {_percent(figures['share_of_one_core_every_run_unchanged_with_postgresql'])}) | ≤ {goal} |",
        f"| share of one core, every run after typical activity (worst realistic case) | "
        f"{_percent(figures['share_of_one_core_every_run_changed'])} (with PostgreSQL's: "
        f"{_percent(figures['share_of_one_core_every_run_changed_with_postgresql'])}) | ≤ {goal} |",
        f"| bytes sent by a changed run / uploads written by the activity | "
        f"{_number(figures['changed_run_bytes_added_vs_uploads_written'], 3)} | of the order of the change |",
        f"| bytes sent by a changed run / the uploads' total | {_number(figures['changed_run_bytes_added_vs_set'], 4)} | ≪ 1 |",
        f"| recovery point at worst (interval + a changed run's wall) | "
        f"{_number(figures['recovery_point_worst_seconds'] and figures['recovery_point_worst_seconds'] / 60)} min | |",
        f"| the product's MAX_RPO for `{figures['schedule']}` (derived) | "
        f"{figures['max_rpo_default_seconds'] / 60:.0f} min | |",
        "",
        f"Load average (1, 5, 15 min): {measured_['load_start']} at the start, {measured_['load_end']} at the end.",
    ]
    for status in results["status"]:
        lines.append(f"`tma-backup status --json` after {status['after']}: exit {status.get('exit')}, max_rpo_hours "
                     f"{status.get('max_rpo_hours')}, recovery point {status.get('recovery_point')} "
                     f"(newest set {status.get('newest_set')}).")
    lines += ["", "A typical 15 minutes of activity: " + json.dumps(results["activity"]["typical_15_minutes"]) + "; "
              "before each unchanged run, TMA Cloud idle: " + json.dumps(results["activity"]["idle_before_unchanged_run"])
              + " (BACKUP_UNCHANGED_IGNORE)."]
    if results["problems"]:
        lines += ["", "**Problems:**", *[f"- {problem}" for problem in results["problems"]]]
    if results["notes"]:
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"
