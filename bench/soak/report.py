"""The soak's report (bench/soak/__main__.py): soak.json (everything), soak.md (the figures) and soak.png (the chart)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

OUTCOME_COLOURS = {"good": "#2e7d32", "failed": "#c62828", "lost": "#212121", "skipped": "#9e9e9e",
                   "unchanged": "#64b5f6", "never received": "#ff9800"}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    runs, faults, sets = results["runs"], results["faults"], results["sets"]
    outcomes = Counter(run["outcome"] for run in runs)
    never = max(0, results["beat_sends"] - len(runs))
    failed = Counter(run["cause"] or "other" for run in runs if run["outcome"] == "failed")
    if outcomes.get("lost"):
        failed["lost (no outcome: worker killed, message lost)"] += outcomes["lost"]
    skipped = Counter(run["cause"] for run in runs if run["outcome"] == "skipped")
    origin = results["origin"]
    recovery = []
    for fault in faults:
        following = [run for run in runs if run["outcome"] == "good" and run["received_at"] >= fault["started"]
                     and run["ended_at"]]
        first = min(following, key=lambda run: run["ended_at"], default=None)
        recovery.append({"fault": fault["number"], "kind": fault["kind"], "started_s": fault["started_s"],
                         "seconds": round(first["ended_at"] - fault["started"], 1) if first else None,
                         "set": first["timestamp"] if first else None})
    by_kind: dict[str, list[float | None]] = {}
    for item in recovery:
        by_kind.setdefault(item["kind"], []).append(item["seconds"])
    kinds = {}
    for kind, values in sorted(by_kind.items()):
        known = [value for value in values if value is not None]
        kinds[kind] = {"count": len(values), "recovered": len(known),
                       "median_s": round(statistics.median(known), 1) if known else None,
                       "max_s": round(max(known), 1) if known else None}
    live_problems = [f"fault {fault['number']} ({fault['kind']}): {problem}"
                     for fault in faults for problem in fault["problems"]]
    return {
        "attempted": len(runs) + never,
        "good": outcomes.get("good", 0),
        "failed": outcomes.get("failed", 0) + outcomes.get("lost", 0),
        "failed_by_cause": dict(failed.most_common()),
        "skipped": outcomes.get("skipped", 0),
        "skipped_by_cause": dict(skipped.most_common()),
        "unchanged": outcomes.get("unchanged", 0),
        "never_received": never,
        "reported_good": len(sets),
        "database_only": sum(1 for item in sets if item.get("database_only")),
        "restorable": sum(1 for item in sets if item["restorable"]),
        "not_restorable": sum(1 for item in sets if not item["restorable"]),
        "faults": len(faults),
        "faults_by_kind": kinds,
        "recovery": recovery,
        "live_problems": live_problems,
        "first_fault_s": min((fault["started_s"] for fault in faults), default=None),
        "origin": origin,
    }


def write(folder: Path, results: dict[str, Any]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarize(results)
    (folder / "soak.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    chart = chart_png(folder / "soak.png", results)
    text = markdown(results, chart)
    (folder / "soak.md").write_text(text)
    return headline(results)


def headline(results: dict[str, Any]) -> str:
    s = results["summary"]
    return (f"sets attempted {s['attempted']}, good {s['good']}, failed {s['failed']} {s['failed_by_cause']}, "
            f"skipped {s['skipped']}, reported good {s['reported_good']}, restorable {s['restorable']}, "
            f"reported good but not restorable {s['not_restorable']}; {s['faults']} faults; repair "
            f"{'converged' if results['convergence']['converged'] else 'DID NOT CONVERGE'}")


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def markdown(results: dict[str, Any], chart: bool) -> str:
    s, machine, times = results["summary"], results["machine"], results["times"]
    lines = [
        f"# The chaos soak: {results['mode']} run of {results['started_at']}",
        "",
        f"{results['fault_minutes']:g} minutes of random faults ({s['faults']} injected, seed {results['seed']}, "
        f"{results['rate_per_hour']:g} per hour) on a TMA Cloud database under a steady write load, with a whole set "
        "(database, uploads, `.env`) taken every minute by two workers and beat into a restic repository on a "
        "SeaweedFS S3 server; then, with the faults stopped, repair and every set the product reported good "
        "restored from the repository and compared with what was live at its snapshot. How: `bench/README.md`, "
        "\"The chaos soak\". Code under test: "
        f"`{str(machine.get('code', {}).get('commit', '?'))[:12]}`.",
        "",
        f"**Machine**: {machine['nproc']} cores ({machine['cpu']}), shared with other developers' test runs: "
        f"`uptime` at the start `{machine['uptime_start']}`, at the end `{machine.get('uptime_end', '?')}`; "
        f"1-minute load average sampled every 15 s: mean {machine.get('load_mean')}, max {machine.get('load_max')}.",
        "",
        "## Sets",
        "",
        "| | count |",
        "| --- | --- |",
        f"| sets attempted (beat's kickoffs, every minute) | {s['attempted']} |",
        f"| good (the chain ended with its prune link) | {s['good']} |",
        f"| failed | {s['failed']} |",
    ]
    for cause, count in s["failed_by_cause"].items():
        lines.append(f"| &nbsp;&nbsp;failed: {cause} | {count} |")
    lines += [f"| skipped ({', '.join(f'{cause}: {count}' for cause, count in s['skipped_by_cause'].items()) or '–'}) "
              f"| {s['skipped']} |"]
    if s["unchanged"]:
        lines.append(f"| unchanged (no set needed) | {s['unchanged']} |")
    if s["never_received"]:
        lines.append(f"| sent by beat, never received by a worker (lost with Redis) | {s['never_received']} |")
    lines += [
        f"| reported good (run results, `repository list`, `status`) | {s['reported_good']} |",
        f"| &nbsp;&nbsp;of which listed without their uploads (the run said their capture failed): the database "
        f"part checked | {s['database_only']} |",
        f"| restored from the repository and identical to what was live | {s['restorable']} |",
        f"| **reported good but not restorable** | **{s['not_restorable']}** |",
        "",
    ]
    if chart:
        lines += ["![Sets and faults over time, outcomes by cause, faults by kind, recovery times](soak.png)", ""]
    lines += ["## Faults", "", "| fault | count | next good set after it: median | max | none before the end |",
              "| --- | --- | --- | --- | --- |"]
    for kind, item in s["faults_by_kind"].items():
        lines.append(f"| `{kind}` | {item['count']} | {_minutes(item['median_s'])} | {_minutes(item['max_s'])} | "
                     f"{item['count'] - item['recovered']} |")
    lines += ["", "The time runs from the fault's start to the end of the first good set whose kickoff came after it.",
              "", "<details><summary>Every fault, in order</summary>", "",
              "| # | at | kind | target | what | outcome | next good set |", "| --- | --- | --- | --- | --- | --- | --- |"]
    recovery = {item["fault"]: item for item in s["recovery"]}
    for fault in results["faults"]:
        after = recovery.get(fault["number"], {})
        lines.append(f"| {fault['number']} | {_minutes(fault['started_s'])} | `{fault['kind']}` | {fault['target']} | "
                     f"{fault['detail'].replace('|', '/')} | {fault['outcome'].replace('|', '/')[:160]} | "
                     f"{_minutes(after.get('seconds'))} |")
    lines += ["", "</details>", ""]
    convergence = results["convergence"]
    lines += ["## The end", "",
              f"- Faults stopped at {_minutes(times.get('faults_to'))}; {len(results['errors'])} soak-level problem(s)"
              + (f": {'; '.join(results['errors'])}" if results["errors"] else "") + ".",
              f"- Repair: {len(convergence['repair_runs'])} run(s), exits "
              f"{[run['exit'] for run in convergence['repair_runs']]}; "
              + ("**converged**: nothing refuses connections but the kept copies "
                 f"({', '.join(convergence['kept_copies']) or 'none'}), no scratch or drill database, nothing of the "
                 "tool's in UPLOAD_DIR but the files kept with a kept copy, no lock held (Redis, restic), no "
                 "interrupted run's files." if convergence["converged"] else
                 f"**did not converge**: {'; '.join(convergence['problems'])}")
              + (" Locks taken by work still running after repair (let go within "
                 f"a minute): {', '.join(held['holder'] for held in convergence['locks_taken_after_repair'])}."
                 if convergence.get("locks_taken_after_repair") else ""),
              "- Live checks after restores and rollbacks: "
              + ("every one found the live database one recorded state and its uploads all there."
                 if not s["live_problems"] else "; ".join(s["live_problems"])),
              f"- The load: {results['load']['ticks']} ticks, {results['load']['blobs']} uploads written, "
              f"{results['load']['purged']} purged, {results['load']['stats']}; errors it rode out: "
              f"{results['load']['errors'] or 'none'}"
              + (f"; **states seen twice with other content**: {results['load']['conflicts']}"
                 if results["load"]["conflicts"] else "."),
              ""]
    activities = results["activities"]
    if activities:
        lines += ["| task | succeeded | failed | skipped |", "| --- | --- | --- | --- |"]
        for name, item in sorted(activities.items()):
            lines.append(f"| `tma_backup.{name}` | {item['succeeded']} | {item['failed']} | {item['skipped']} |")
        lines.append("")
    bad = [item for item in results["sets"] if not item["restorable"]]
    if bad:
        lines += ["## Sets reported good that did not restore", ""]
        for item in bad:
            lines.append(f"- `{item['timestamp']}` ({', '.join(item['sources'])}): {'; '.join(item['problems'])}")
        lines.append("")
    noted = [item for item in results["sets"] if item["notes"] and not item.get("database_only")]
    if noted:
        lines += [f"Notes: {len(noted)} set(s) lack uploads that TMA Cloud purged from the trash (15 days after) "
                  "while they were taken: the blob gone, the row still in the snapshot.", ""]
    return "\n".join(lines)


def chart_png(path: Path, results: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    s = results["summary"]
    origin = results["origin"]
    figure = plt.figure(figsize=(13, 9))
    grid = figure.add_gridspec(2, 3, height_ratios=[1.25, 1])
    timeline = figure.add_subplot(grid[0, :])
    kinds = sorted({fault["kind"] for fault in results["faults"]})
    for row, kind in enumerate(kinds):
        for fault in results["faults"]:
            if fault["kind"] == kind:
                start = fault["started_s"] / 60
                timeline.barh(row, max(fault["seconds"] / 60, 0.15), left=start, color="#ef6c00", alpha=0.75)
    offset = len(kinds) + 0.8
    for run in results["runs"]:
        at = (run["received_at"] - origin) / 60
        colour = OUTCOME_COLOURS.get(run["outcome"], "#000")
        timeline.scatter(at, offset, color=colour, marker="o" if run["outcome"] == "good" else "x", s=28, zorder=3)
    handles = [Line2D([], [], color=colour, marker="o", linestyle="", label=name)
               for name, colour in OUTCOME_COLOURS.items() if name != "never received"]
    timeline.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.06), fontsize=8, ncol=5, frameon=False)
    timeline.set_yticks([*range(len(kinds)), offset], [*kinds, "sets"])
    timeline.set_xlabel("minutes since the faults began")
    timeline.set_title(f"Faults (bars) and sets (a mark a minute), seed {results['seed']}", loc="left", pad=22,
                       fontsize=10)
    loads = results["machine"].get("load_samples") or []
    if loads:
        twin = timeline.twinx()
        twin.plot([moment / 60 for moment, _ in loads], [value for _, value in loads], color="#7e57c2", lw=0.8)
        twin.set_ylabel("load average (1 min)", color="#7e57c2", fontsize=8)
    outcomes = figure.add_subplot(grid[1, 0])
    labels = ["good", *[f"failed: {cause}"[:38] for cause in s["failed_by_cause"]], "skipped", "never received"]
    values = [s["good"], *s["failed_by_cause"].values(), s["skipped"], s["never_received"]]
    colours = [OUTCOME_COLOURS["good"], *([OUTCOME_COLOURS["failed"]] * len(s["failed_by_cause"])),
               OUTCOME_COLOURS["skipped"], OUTCOME_COLOURS["never received"]]
    outcomes.barh(labels[::-1], values[::-1], color=colours[::-1])
    outcomes.set_title(f"{s['attempted']} sets attempted; {s['not_restorable']} reported good\nbut not restorable",
                       fontsize=10)
    outcomes.tick_params(axis="y", labelsize=7)
    by_kind = figure.add_subplot(grid[1, 1])
    names = list(s["faults_by_kind"])
    by_kind.barh(names[::-1], [s["faults_by_kind"][name]["count"] for name in names][::-1], color="#ef6c00")
    by_kind.set_title(f"{s['faults']} faults by kind", fontsize=10)
    by_kind.tick_params(axis="y", labelsize=7)
    recovery = figure.add_subplot(grid[1, 2])
    for item in s["recovery"]:
        if item["seconds"] is not None:
            recovery.scatter(item["started_s"] / 60, item["seconds"] / 60, color="#ef6c00", s=18)
    recovery.set_xlabel("fault at (minutes)", fontsize=8)
    recovery.set_ylabel("to the next good set (minutes)", fontsize=8)
    recovery.set_title("recovery: fault → next good set", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
