"""The benchmark's outputs: `latest.json`, a Markdown table `latest.md` and a chart `latest.png`."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

# Issue 6's targets (reported beside the figures; nothing here asserts a timing).
TARGETS: dict[str, tuple[str, float]] = {
    "chain_vs_bare": ("<=", 1.05),
    "fast_vs_seed": (">=", 2.5),
    "fast_size_vs_seed": ("<=", 1.0),
    "restore_vs_seed": ("<=", 0.9),
    "docker_stream_vs_exec": (">=", 0.95),
    "docker_worker_rss_growth_mb": ("<", 100.0),
    "fleet_2w_vs_1w": (">=", 1.6),
    # the off-site repository (g.), as issue 24 restated issue 11's: the link without its read-back within
    # 5 % of bare restic, and with it within 0.6 s; the second night's bytes on a night of appends only
    "offsite_without_read_back_vs_bare_restic": ("<=", 1.05),
    "offsite_minus_bare_restic_seconds": ("<=", 0.6),
    "second_night_bytes_ratio": ("<=", 0.10),
    "second_night_bytes_ratio_zstd": ("<=", 0.10),
    "restore_from_repository_vs_local": ("<=", 1.3),
    # issue 22: the vault (h.)
    "vault_pull_vs_bare_copy": ("<=", 1.1),
    "vault_second_night_bytes_ratio": ("<=", 1.05),
}
# Reported beside them, without a target of their own.
# After any other night than `append` (bench/churn.py) the second night's figures have no target: rows
# changed at random places cost restic a whole chunk each, whatever we do; the Z0 floor is reported beside.
ON_APPEND_NIGHTS_ONLY = ("second_night_bytes_ratio", "second_night_bytes_ratio_zstd")
INFORMATIVE = ("offsite_vs_bare_restic", "second_night_bytes_ratio_z0",
               "offsite_vs_bare_restic_local", "offsite_vs_bare_restic_first_night",
               "offsite_without_read_back_vs_bare_restic_local",
               "offsite_vs_bare_restic_local_first_night", "second_night_stored_ratio", "second_night_stored_ratio_zstd",
               "vault_pull_vs_bare_copy_local", "vault_second_night_bytes_ratio_local", "vault_copy_vs_bare_copy",
               "vault_copy_vs_bare_copy_local", "vault_pull_without_listings_vs_bare_copy",
               "vault_pull_without_listings_vs_bare_copy_local", "vault_pull_process_vs_bare_copy",
               "vault_pull_process_vs_bare_copy_local", "vault_pull_cpu_vs_bare_copy", "vault_pull_cpu_vs_bare_copy_local",
               "vault_copy_cpu_vs_bare_copy", "vault_copy_cpu_vs_bare_copy_local",
               "vault_pull_listings_seconds", "vault_pull_listings_seconds_local",
               "vault_restic_open_seconds", "vault_restic_open_seconds_local", "vault_first_night_bytes_ratio",
               "vault_first_night_bytes_ratio_local", "db_size_bytes")
RATIO_MEANING = {
    "chain_vs_bare": "b / a wall: the tma-backup chain (Celery, exact counts, checks) vs the seed's bare tools, same compression",
    "fast_vs_seed": "a / c wall: how many times faster tma-backup's fastest safe mode is than the seed's sequence",
    "fast_size_vs_seed": "c / a bytes: that mode's file size vs the seed's",
    "restore_vs_seed": "tma / seed wall: tma-backup's restore vs the seed's as documented (check SHA-256 and TOC, drop, "
                       "create, --single-transaction restore, ANALYZE)",
    "docker_stream_vs_exec": "throughput of tma-backup's docker mode / `docker exec … pg_dump > file`",
    "docker_worker_rss_growth_mb": "peak growth of the docker-mode worker's RSS during a backup, MiB",
    "fleet_2w_vs_1w": "throughput of 8 backups with two worker processes / with one",
    "db_size_bytes": "pg_database_size of the reference database",
    "offsite_vs_bare_restic": "g. the offsite link of a nightly run (result backend; the previous run's listing handed "
                              "over) / a bare `restic backup DUMP META` of the same files, both uploads into a fresh "
                              "repository on a SeaweedFS S3 server",
    "offsite_vs_bare_restic_first_night": "g. the same with the offsite link of a first night (it lists the repository "
                                          "first: one restic command more)",
    "offsite_vs_bare_restic_local_first_night": "g. offsite_vs_bare_restic_first_night with a repository on a local path",
    "second_night_bytes_ratio": "g. bytes the second night's set adds to the repository (restic's data_added) / the "
                                "first night's, BACKUP_COMPRESSION=6",
    "second_night_bytes_ratio_zstd": "g. the same with BACKUP_COMPRESSION=zstd-stream",
    "second_night_bytes_ratio_z0": "g. the same with BACKUP_COMPRESSION=0: the floor, what restic's chunking alone "
                                   "adds for that night (no compression moves bytes around)",
    "offsite_minus_bare_restic_seconds": "g. the offsite link's median wall, read-back included, less bare restic "
                                         "backup's (S3), in seconds",
    "restore_from_repository_vs_local": "g. `restore --from-repository latest` into an empty BACKUP_DIR (S3) / "
                                        "`restore FILE` of the same backup",
    "offsite_vs_bare_restic_local": "g. offsite_vs_bare_restic with a repository on a local path",
    "offsite_without_read_back_vs_bare_restic": "g. offsite_vs_bare_restic less the link's read-back (`restic ls` of "
                                                "the set, timed in the link), round by round: the link's upload and "
                                                "its own overhead against bare restic's upload",
    "offsite_without_read_back_vs_bare_restic_local": "g. the same with a repository on a local path",
    "second_night_stored_ratio": "g. second_night_bytes_ratio in bytes stored on the S3 server (after restic's "
                                 "compression), BACKUP_COMPRESSION=6",
    "second_night_stored_ratio_zstd": "g. the same, BACKUP_COMPRESSION=zstd-stream",
    "vault_pull_vs_bare_copy": "h. `tma-backup vault pull` of one whole set (database and uploads part; the pull's own "
                               "wall, in its process) into a fresh vault / a bare `restic copy` of the same two "
                               "snapshots into an equivalent fresh vault, on a SeaweedFS S3 server",
    "vault_second_night_bytes_ratio": "h. bytes the vault stored on the second night (its pull of the night's set, "
                                      "after a night of churn and uploads) / bytes the primary stored for that night, S3",
    "vault_pull_vs_bare_copy_local": "h. vault_pull_vs_bare_copy with the primary and the vaults on local paths",
    "vault_second_night_bytes_ratio_local": "h. vault_second_night_bytes_ratio on local paths",
    "vault_copy_vs_bare_copy": "h. the pull's own `restic copy --no-lock` command / the bare `restic copy`, S3",
    "vault_copy_vs_bare_copy_local": "h. the same on local paths",
    "vault_pull_without_listings_vs_bare_copy": "h. the pull less its listings (the primary's, the vault's, and the "
                                                "vault's again to confirm), round by round / the bare copy, S3",
    "vault_pull_without_listings_vs_bare_copy_local": "h. the same on local paths",
    "vault_pull_process_vs_bare_copy": "h. the pull's whole process (interpreter start, imports, the pull) / the bare "
                                       "copy, S3: `tma-backup vault pull` as typed, where a worker has paid the imports",
    "vault_pull_process_vs_bare_copy_local": "h. the same on local paths",
    "vault_pull_cpu_vs_bare_copy": "h. CPU seconds (user and system) of the pull (its process's and its restic "
                                   "commands') / of the bare copy, S3: the work each does, whatever else loads the machine",
    "vault_pull_cpu_vs_bare_copy_local": "h. the same on local paths",
    "vault_copy_cpu_vs_bare_copy": "h. CPU seconds of the pull's own `restic copy --no-lock` / of the bare copy, S3",
    "vault_copy_cpu_vs_bare_copy_local": "h. the same on local paths",
    "vault_pull_listings_seconds": "h. seconds the pull's three listings take together (median), S3",
    "vault_pull_listings_seconds_local": "h. the same on local paths",
    "vault_restic_open_seconds": "h. seconds a `restic cat config` of the vault takes (median): opening a repository, "
                                 "mostly key derivation, which every restic command pays, S3",
    "vault_restic_open_seconds_local": "h. the same on a local path",
    "vault_first_night_bytes_ratio": "h. the first night's: bytes the vault stored / bytes the primary stored, S3",
    "vault_first_night_bytes_ratio_local": "h. the same on local paths",
}


@dataclass
class Measurement:
    key: str
    label: str
    short: str = ""  # the chart's label
    walls: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    na: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def size(self) -> int | None:
        return int(statistics.median(self.sizes)) if self.sizes else None

    def step_medians(self) -> dict[str, float]:
        names = [name for name in (self.steps[0] if self.steps else {})]
        return {name: round(statistics.median(s[name] for s in self.steps if name in s), 3) for name in names}

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any]) -> Measurement:
        """A measurement of an earlier run, as `as_json` wrote it (its steps as their medians)."""
        return cls(key, data.get("label", key), data.get("short", ""), list(data.get("walls_s", [])),
                   list(data.get("bytes", [])), [data["step_medians_s"]] if data.get("step_medians_s") else [],
                   list(data.get("extra", [])), list(data.get("errors", [])), data.get("na"))

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "short": self.short,
            "median_wall_s": None if self.wall is None else round(self.wall, 3),
            "median_bytes": self.size,
            "walls_s": [round(value, 3) for value in self.walls],
            "bytes": self.sizes,
            "step_medians_s": self.step_medians(),
            "extra": self.extra,
            "errors": self.errors,
            "na": self.na,
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def target_of(key: str, results: dict[str, Any]) -> tuple[str, float] | None:
    """The key's target in these results: none for the second night's bytes after a night that is not
    `append` (the churn is in g.'s details)."""
    churn = (results.get("repository") or {}).get("churn")
    if key in ON_APPEND_NIGHTS_ONLY and churn != "append":
        return None
    return TARGETS.get(key)


def meets(key: str, value: float | None, results: dict[str, Any]) -> str:
    target = target_of(key, results)
    if value is None or target is None:
        return ""
    op, bound = target
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
    return "yes" if ok else "no"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(value: int | None) -> str:
    return "" if value is None else f"{value / MIB:,.1f} MiB"


def markdown(results: dict[str, Any], measurements: list[Measurement]) -> str:
    machine = results["machine"]
    lines = [
        f"# tma-backup benchmark ({'quick smoke run' if results['quick'] else 'reference run'})",
        "",
        f"{results['finished_at']} · {machine['nproc']} cores ({machine['cpu']}), {machine['mem_gib']} GiB RAM · "
        f"{machine['pg_dump']} · server {machine['server_version']} · load average at start "
        f"{machine['loadavg_start']}, at end {machine.get('loadavg_end', '?')}",
        f"Database `{results['database']}`: {_size(results['db_size_bytes'])} on disk "
        f"({results['db_size_bytes']} bytes) · medians of {results['runs']} run(s) each",
        "",
        "| figure | value | target | meets | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in [key for key in (*TARGETS, *INFORMATIVE) if key in results]:
        value = results[key]
        bound = target_of(key, results)
        target = f"{bound[0]} {bound[1]}" if bound else ("on `append` nights" if key in ON_APPEND_NIGHTS_ONLY else "")
        note = RATIO_MEANING[key]
        if key in ("fast_vs_seed", "fast_size_vs_seed") and results.get("fast_mode"):
            note += f" (mode: {results['fast_mode']})"
        lines.append(f"| `{key}` | {_fmt(value)} | {target} | {meets(key, value, results)} | {note} |")
    lines += ["", "| measurement | median wall (s) | runs (s) | file | where the time goes (median s) |",
              "| --- | --- | --- | --- | --- |"]
    for item in measurements:
        if item.na is not None and not item.walls:
            lines.append(f"| {item.label} | n/a | | | {item.na} |")
            continue
        steps = ", ".join(f"{name} {value:.2f}" for name, value in item.step_medians().items())
        notes = [f"{key} {value}" for extra in item.extra[-1:] for key, value in extra.items()]
        steps = "; ".join(part for part in (steps, ", ".join(notes)) if part)
        if item.errors:
            steps = (steps + "; " if steps else "") + f"FAILED: {item.errors[0]}"
        runs = ", ".join(f"{value:.2f}" for value in item.walls)
        lines.append(f"| {item.label} | {_fmt(item.wall, 2)} | {runs} | {_size(item.size)} | {steps} |")
    if results.get("paired"):
        lines += ["", "Ratios within each round (a round's variants run back to back, so under about the same load from elsewhere):", ""]
        lines += [f"- `{name}`: median {value['median']:.3f} of {', '.join(f'{r:.3f}' for r in value['rounds'])}"
                  for name, value in results["paired"].items()]
    if results.get("fleet_bare_2_vs_1") is not None:
        lines += ["", f"The machine's own ceiling for `fleet_2w_vs_1w`: the same 8 seed backups with bare tools "
                  f"in 2 parallel streams vs 1: {results['fleet_bare_2_vs_1']:.3f}."]
    if results.get("restore_vs_seed_without_its_checks") is not None:
        lines += ["", "`restore_vs_seed` without the seed's own check of the file (sha256sum, pg_restore --list), while "
                  f"tma-backup keeps all of its own: {results['restore_vs_seed_without_its_checks']:.3f}."]
    lines += repository_lines(results)
    lines += vault_lines(results)
    if results.get("notes"):
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def repository_lines(results: dict[str, Any]) -> list[str]:
    """g.: what the night changed, and where and when g. was measured when that was another run."""
    info = results.get("repository") or {}
    lines: list[str] = []
    night = info.get("night")
    if night:
        done = {"insert": "inserted", "update": "updated", "delete": "deleted"}
        tables = "; ".join(f"{table.split('.')[-1]} " + ", ".join(f"{count} {done.get(kind, kind)}"
                                                               for kind, count in kinds.items())
                           for table, kinds in night["tables"].items())
        lines += ["", f"g. The night before the second backup (`{night['scenario']}`, bench/churn.py): "
                  f"{night['rows_changed']} of {night['rows_before']} rows changed ({night['share']:.2%}): {tables}."]
    measured = info.get("measured")
    if measured and measured.get("finished_at") != results.get("finished_at"):
        load = f"{measured['machine'].get('loadavg_start', '?')} → {measured['machine'].get('loadavg_end', '?')}"
        lines += ["", f"g. was measured on its own (`--only repository`) at {measured['finished_at']} on "
                  f"`{measured['database']}` ({_size(measured['db_size_bytes'])}), medians of {measured['runs']}, "
                  f"code {measured['machine'].get('code', {}).get('commit', '?')[:12]}, load average {load}."]
    if info.get("restic"):
        lines += ["", f"g. {info['restic']}; S3: {info.get('s3', '?')}."]
    return lines


def vault_lines(results: dict[str, Any]) -> list[str]:
    """h.: the set, what the night changed, each vault's key derivation, where and when h. was measured."""
    info = results.get("vault") or {}
    lines: list[str] = []
    shape, uploads = info.get("set") or {}, info.get("uploads") or {}
    if shape:
        lines += ["", f"h. The set: {shape.get('snapshots')} snapshots ({', '.join(shape.get('parts', []))}): "
                  f"the dump {_size(shape.get('file_size_bytes'))}, {shape.get('uploads_files')} uploads "
                  f"{_size(shape.get('uploads_bytes'))} (each `files` row's upload; {_size(uploads.get('bytes'))} "
                  "written)."]
    night = info.get("night")
    if night:
        done = {"insert": "inserted", "update": "updated", "delete": "deleted"}
        tables = "; ".join(f"{table.split('.')[-1]} " + ", ".join(f"{count} {done.get(kind, kind)}"
                                                               for kind, count in kinds.items())
                           for table, kinds in night["tables"].items())
        made = night.get("uploads") or {}
        lines += ["", f"h. The night before the second set (`{night['scenario']}`, bench/churn.py): "
                  f"{night['rows_changed']} of {night['rows_before']} rows changed ({night['share']:.2%}): {tables}; "
                  f"uploads: {made.get('added')} new ({_size(made.get('added_bytes'))}), {made.get('renamed')} renamed."]
    if info.get("kdf"):
        lines += ["", "h. The rounds' vaults' key (both sides share it): " + "; ".join(
            f"{kind} {kdf.get('kdf')} N={kdf.get('N')} r={kdf.get('r')} p={kdf.get('p')}"
            for kind, kdf in info["kdf"].items()) + "."]
    measured = info.get("measured")
    if measured and measured.get("finished_at") != results.get("finished_at"):
        load = f"{measured['machine'].get('loadavg_start', '?')} → {measured['machine'].get('loadavg_end', '?')}"
        lines += ["", f"h. was measured on its own (`--only vault`) at {measured['finished_at']} on "
                  f"`{measured['database']}` ({_size(measured['db_size_bytes'])}), medians of {measured['runs']}, "
                  f"code {measured['machine'].get('code', {}).get('commit', '?')[:12]}, load average {load}."]
    if info.get("restic"):
        lines += ["", f"h. {info['restic']}; S3: {info.get('s3', '?')}."]
    return lines


def merged(folder: Path, results: dict[str, Any], measurements: list[Measurement],
           keys: list[str], letter: str = "g", info: str = "repository") -> tuple[dict[str, Any], list[Measurement]]:
    """`--only SECTION`: the results already in `folder` with this run's section put in place of
    theirs (its figures, measurements, medians, paired ratios, notes and failures); the rest kept.
    `letter` is the section's (its labels start with it), `info` the key of its details."""
    try:
        previous = json.loads((folder / "latest.json").read_text())
    except (OSError, ValueError):
        return results, measurements
    ours = set(keys)
    labels = tuple(item.label for item in measurements if item.key in ours)
    mine = {key for key in (*TARGETS, *INFORMATIVE, info) if key in results and key != "db_size_bytes"}
    combined = {**previous, **{key: results[key] for key in mine}}
    combined["medians"] = {**{key: value for key, value in previous.get("medians", {}).items() if key not in ours},
                           **{key: value for key, value in results["medians"].items() if key in ours}}
    pair_names = set(results.get("paired", {})) | mine  # g.'s pairs are named as its figures
    combined["paired"] = {**{name: value for name, value in previous.get("paired", {}).items()
                             if name not in pair_names}, **results.get("paired", {})}
    combined["notes"] = [note for note in previous.get("notes", []) if not note.startswith((f"{letter}. ", *labels))] + \
        results.get("notes", [])
    combined["failures"] = [failure for failure in previous.get("failures", [])
                            if not failure.startswith(f"{letter}. ")] + results.get("failures", [])
    current = {item.key: item for item in measurements}
    kept = [Measurement.from_json(key, data) for key, data in previous.get("measurements", {}).items() if key not in ours]
    for item in kept:
        item.short = item.short or (current[item.key].short if item.key in current else "")
    return combined, kept + [item for item in measurements if item.key in ours]


def chart(path: Path, results: dict[str, Any], measurements: list[Measurement]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[WARN]  matplotlib is not installed (pip install -r bench/requirements.txt): no chart", file=sys.stderr)
        return False
    timed = [item for item in measurements if item.wall is not None]
    sized = [item for item in timed if item.size is not None and not item.key.startswith(
        ("restore", "fleet", "repo_restore", "repo_offsite", "vault_pull", "vault_bare", "vault_open"))]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * max(len(timed), 4) + 1.8),
                                         gridspec_kw={"width_ratios": [3, 2]})
    labels = [item.short or item.key for item in timed]
    left.barh(labels, [item.wall for item in timed], color="#4c72b0")
    for index, item in enumerate(timed):
        left.text(item.wall, index, f" {item.wall:.2f}s", va="center", fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("median wall time (s)")
    right.barh([item.short or item.key for item in sized], [item.size / MIB for item in sized], color="#dd8452")
    for index, item in enumerate(sized):
        right.text(item.size / MIB, index, f" {item.size / MIB:,.0f}", va="center", fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("file size; h.: bytes stored (MiB)" if any(item.key.startswith("vault_") for item in sized)
                     else "file size (MiB)")
    subject = "tma-backup vs bare PostgreSQL tools"
    if timed and all(item.key.startswith("vault_") for item in timed):
        subject = "h. the vault: tma-backup vault pull vs bare restic copy"
    figure.suptitle(f"{subject} · {results['db_size_bytes'] / MIB:,.0f} MiB database · "
                    f"{results['machine']['nproc']} cores · medians of {results['runs']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(folder: Path, results: dict[str, Any], measurements: list[Measurement],
          merge: list[str] | None = None, section: tuple[str, str, str] | None = None) -> str:
    """Write latest.json, latest.md and latest.png. With `merge` (the keys of the measurements this run
    made, `--only`), the results already in `folder` keep everything else, and `section` (its name, letter
    and details' key) has this run's figures written alone too, as <name>.json, .md and .png."""
    folder.mkdir(parents=True, exist_ok=True)
    if merge is not None and section is not None:
        name, letter, info = section
        ours = [item for item in measurements if item.key in set(merge)]
        _write(folder, name, results, ours)
        results, measurements = merged(folder, results, measurements, merge, letter, info)
    return _write(folder, "latest", results, measurements)


def _write(folder: Path, name: str, results: dict[str, Any], measurements: list[Measurement]) -> str:
    results = {**results, "measurements": {item.key: item.as_json() for item in measurements}}
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, measurements)
    (folder / f"{name}.md").write_text(table)
    chart(folder / f"{name}.png", results, measurements)
    return table
