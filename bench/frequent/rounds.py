"""The rounds: the product's `backup --if-changed` and the bare tools, on the same state, in turn."""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.frequent.measure import (
    HOST,
    PORT,
    ROOT,
    USER,
    Ran,
    checked,
    folder_bytes,
    loadavg,
    measured,
    postmaster_pid,
    say,
)
from bench.frequent.site import ACTIVITY, DATABASE, IDLE, UPLOADS, Site

TMA_BACKUP = str(ROOT / ".venv" / "bin" / "tma-backup")
WORK_MARKER = ".bench-frequent"  # a work folder without it is never removed
SCHEDULE = "*/15 * * * *"
GOAL_SHARE = 0.02  # issue 24: a 15-minute cadence costs at most 2 % of one core
_INHERITED = ("DB_", "BACKUP_", "CELERY_", "RESTORE_", "REPOSITORY_", "PG", "WORKER_", "UPLOAD", "TMA_", "STORAGE_",
              "FILE_ENCRYPTION", "RESTIC_", "AWS_", "R2_", "RUSTFS_", "MAX_RPO", "NOTIFY_", "HEALTHCHECK_", "VAULT_")


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    measurements: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restic_floor: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) of `restic snapshots`

    def __post_init__(self) -> None:
        self.site = Site(self.work, self.args.uploads_mb, self.args.reference)
        self.repository = self.work / "repository"
        self.bare_repository = self.work / "bare-repository"
        self.backup_dir = self.work / "backups"
        self.bare_dir = self.work / "bare"
        self.home = self.work / "home"
        self.env_file = self.work / "tma-cloud.env"
        self.postmaster = postmaster_pid()

    # environments
    def restic_env(self, repository: Path) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                "XDG_CACHE_HOME": str(self.home / "cache"), "RESTIC_REPOSITORY": str(repository),
                "RESTIC_PASSWORD": self.password}

    def cli_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED)}
        env.update({"DB_MODE": "host", "DB_HOST": HOST, "DB_PORT": PORT, "DB_USER": USER, "DB_NAME": DATABASE,
                    "BACKUP_DIR": str(self.backup_dir), "BACKUP_REPOSITORY": str(self.repository),
                    "BACKUP_REPOSITORY_PASSWORD": self.password, "BACKUP_SCHEDULE": SCHEDULE,
                    "TMA_ENV_FILE": str(self.env_file), "HOME": str(self.home),
                    "XDG_CACHE_HOME": str(self.home / "cache")})
        if self.args.compression:
            env["BACKUP_COMPRESSION"] = self.args.compression
        return env

    def cli(self, *args: str) -> Ran:
        return measured([TMA_BACKUP, *args], self.cli_env(), self.work, self.postmaster, DATABASE)

    def restic(self, repository: Path, *args: str) -> Ran:
        return checked(measured(["restic", *args], self.restic_env(repository), self.work, None, DATABASE), f"restic {args[0]}")

    def snapshots(self, repository: Path) -> list[dict[str, Any]]:
        listed = self.restic(repository, "snapshots", "--json")
        if repository == self.repository:  # context: what any one restic command costs here
            self.restic_floor.append((listed.wall, listed.cpu))
        return json.loads(listed.stdout or "[]")

    # state the checks read
    def record(self) -> dict[str, Any] | None:
        found = sorted(self.backup_dir.glob(".last-set-*.json"))
        if len(found) != 1:
            return None
        return json.loads(found[0].read_text())

    def dumps(self) -> list[str]:
        return sorted(path.name for path in self.backup_dir.glob(f"{DATABASE}_*") if path.name.endswith((".dump", ".dump.zst")))

    def state(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots(self.repository), "dumps": self.dumps(), "record": self.record(),
                "repository_bytes": folder_bytes(self.repository)}

    # set-up
    def prepare(self) -> dict[str, Any]:
        if self.work.exists():
            if not (self.work / WORK_MARKER).exists() and any(self.work.iterdir()):
                raise SystemExit(f"[ERROR] {self.work} exists and bench.frequent did not make it: refusing to use it")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        (self.work / WORK_MARKER).write_text("bench.frequent's work folder: removed at the end unless --keep\n")
        self.backup_dir.mkdir(mode=0o700)
        self.bare_dir.mkdir()
        (self.home / "cache").mkdir(parents=True)
        shape = "the reference set" if self.args.reference else f"{UPLOADS} uploads of {self.args.uploads_mb} MiB"
        say(f"TMA Cloud: database {DATABASE}, {shape}, uploads in {self.site.upload_dir}")
        data = self.site.create()
        say(f"  {data['rows']} rows, {data['uploads']} uploads, {data['uploads_bytes'] / 1e6:.1f} MB")
        self.env_file.write_text("# TMA Cloud's .env (the parts tma-backup reads)\nSTORAGE_DRIVER=local\n"
                                 f"UPLOAD_DIR={self.site.upload_dir}\nFILE_ENCRYPTION_KEY={secrets.token_hex(16)}\n"
                                 "NODE_ENV=production\n")
        self.env_file.chmod(0o600)
        checked(self.cli("repository", "init"), "tma-backup repository init")
        self.restic(self.bare_repository, "init")
        return data

    def first_sets(self) -> None:
        """The first whole set (recorded, not in the medians), and the bare repository's first set."""
        before = folder_bytes(self.repository)
        ran = checked(self.cli("backup"), "the first whole set (tma-backup backup)")
        after = self.state()
        if len(after["snapshots"]) != 2 or after["record"] is None:
            self.problems.append(f"the first set made {len(after['snapshots'])} snapshot(s) (expected 2: database,"
                                 f" uploads), record {after['record']}")
        self.add("first whole set", 0, ran, after["repository_bytes"] - before, sets=len(after["snapshots"]))
        self.bare_set("bare set, first", 0)

    # the measurements
    def add(self, step: str, round_: int, ran: Ran, sent: int | None, **extra: Any) -> dict[str, Any]:
        load = loadavg()
        item = {"step": step, "round": round_, "wall_seconds": round(ran.wall, 3), "cpu_seconds": round(ran.cpu, 3),
                "user_seconds": round(ran.user, 3), "system_seconds": round(ran.system, 3),
                "server_cpu_seconds": None if ran.server is None else round(ran.server, 3),
                "repository_bytes_added": sent, "load": load, **extra}
        self.measurements.append(item)
        server = "n/a" if ran.server is None else f"{ran.server:.2f}"
        say(f"  {step}: {ran.wall:.2f} s wall, {ran.cpu:.2f} s CPU (+ PostgreSQL {server} s),"
            f" {'n/a' if sent is None else f'{sent / 1e3:.0f} kB'} added (load {load[0]})")
        return item

    def if_changed(self, step: str, round_: int, expect_unchanged: bool) -> None:
        before = self.state()
        time.sleep(1.1)  # one set a second: two runs never share a timestamp
        ran = self.cli("backup", "--if-changed")
        after = self.state()
        new_sets = [item for item in after["snapshots"] if item["id"] not in {old["id"] for old in before["snapshots"]}]
        said_unchanged = "Unchanged  :" in ran.output
        record = after["record"] or {}
        check = {"exit": ran.code, "said_unchanged": said_unchanged, "new_snapshots": len(new_sets),
                 "new_dumps": len(after["dumps"]) - len(before["dumps"]),
                 "record_timestamp": record.get("timestamp"), "record_checked_at": record.get("checked_at")}
        restic_added = {}
        for item in new_sets:
            tags = item.get("tags") or []
            part = next((tag[5:] for tag in tags if tag.startswith("part:")), "?")
            added = next((tag[6:] for tag in tags if tag.startswith("added:")), None)
            restic_added[part] = int(added) if added and added.isdigit() else None
        if new_sets and after["dumps"]:  # the uploads part's data_added is in the .meta, not in a tag
            from worker.archive import catalogue
            from worker.archive.meta import read_meta

            extra = read_meta(catalogue.meta_path(self.backup_dir / after["dumps"][-1])).extra
            if extra.get("uploads_bytes_added") is not None:
                restic_added["uploads"] = int(extra["uploads_bytes_added"])
        if ran.code != 0:
            self.problems.append(f"round {round_}, {step}: exit {ran.code}: {ran.output.strip()[-600:]}")
        elif expect_unchanged:
            old_check = (before["record"] or {}).get("checked_at")
            if not said_unchanged or new_sets or check["new_dumps"] or not record.get("checked_at") \
                    or record.get("checked_at") == old_check:
                self.problems.append(f"round {round_}, {step}: not taken as unchanged: {check}")
        elif said_unchanged or len(new_sets) != 2 or check["new_dumps"] != 1 \
                or record.get("timestamp") == (before["record"] or {}).get("timestamp"):
            self.problems.append(f"round {round_}, {step}: no new set of two parts after the activity: {check}")
        self.add(step, round_, ran, after["repository_bytes"] - before["repository_bytes"], check=check,
                 restic_data_added=restic_added or None)

    def bare_set(self, step: str, round_: int) -> None:
        """The bare tools: pg_dump -Fc, then restic backup of the dump and of UPLOAD_DIR (two snapshots,
        as the product's two parts), into the bare repository."""
        dump = self.bare_dir / f"{DATABASE}.dump"
        before = folder_bytes(self.bare_repository)
        pg_dump = checked(measured(["pg_dump", "-h", HOST, "-p", PORT, "-U", USER, "-Fc", "--compress=6", "-f", str(dump),
                                    DATABASE], {**os.environ, "PGCONNECT_TIMEOUT": "10"}, self.work, self.postmaster, DATABASE),
                          "pg_dump")
        database_part = self.restic(self.bare_repository, "backup", "--json", "--tag", "part:database", str(dump))
        uploads_part = self.restic(self.bare_repository, "backup", "--json", "--tag", "part:uploads",
                                   str(self.site.upload_dir))
        sent = folder_bytes(self.bare_repository) - before
        total = Ran(["bare set"], 0, pg_dump.wall + database_part.wall + uploads_part.wall,
                    pg_dump.user + database_part.user + uploads_part.user,
                    pg_dump.system + database_part.system + uploads_part.system, pg_dump.server, "")
        self.add(step, round_, total, sent, pg_dump={"wall_seconds": round(pg_dump.wall, 3),
                                                      "cpu_seconds": round(pg_dump.cpu, 3),
                                                      "server_cpu_seconds": None if pg_dump.server is None
                                                      else round(pg_dump.server, 3),
                                                      "dump_bytes": dump.stat().st_size},
                 restic_seconds={"database": round(database_part.wall, 3), "uploads": round(uploads_part.wall, 3)})
        dump.unlink()

    def status(self) -> dict[str, Any] | None:
        """The product's own view (`tma-backup status --json`, untimed): MAX_RPO and the recovery point."""
        ran = self.cli("status", "--json")
        try:
            facts = json.loads(ran.stdout)
        except ValueError:
            self.notes.append(f"status --json gave no JSON (exit {ran.code}): {ran.output.strip()[-300:]}")
            return None
        repository = facts.get("repository") or {}
        backup = facts.get("backup") or {}
        return {"exit": ran.code, "problems": facts.get("problems"),
                "max_rpo_hours": repository.get("max_rpo_hours"), "recovery_point": repository.get("recovery_point"),
                "newest_set": repository.get("timestamp"), "unchanged_checked_at": backup.get("unchanged_checked_at")}

    def main(self) -> dict[str, Any]:
        started = datetime.now(timezone.utc)
        load_start = loadavg()
        say(f"load average at the start: {load_start}")
        data = self.prepare()
        self.first_sets()
        activities, statuses = [], []
        for round_ in range(1, self.args.runs + 1):
            say(f"round {round_}")
            bare_first = round_ % 2 == 0  # the sides take turns going first
            self.site.idle()
            if bare_first:
                self.bare_set("bare set, nothing changed", round_)
            self.if_changed("unchanged run", round_, expect_unchanged=True)
            if not bare_first:
                self.bare_set("bare set, nothing changed", round_)
            if round_ == 1:
                statuses.append({"after": "the first unchanged run", **(self.status() or {})})
            activities.append(self.site.activity())
            if bare_first:
                self.bare_set("bare set, after activity", round_)
            self.if_changed("changed run", round_, expect_unchanged=False)
            if not bare_first:
                self.bare_set("bare set, after activity", round_)
        help_run = self.cli("--help")  # the CLI's start-up alone (Python, click): what every run pays first
        self.add("CLI start-up (tma-backup --help)", 0, help_run, None)
        statuses.append({"after": "the last changed run", **(self.status() or {})})
        return self.summarise(started, load_start, data, activities, statuses)

    def summarise(self, started: datetime, load_start: list[float], data: dict[str, Any],
                  activities: list[dict[str, int]], statuses: list[dict[str, Any]]) -> dict[str, Any]:
        from worker.coordination.schedule import longest_gap, max_rpo

        def median(step: str, key: str) -> float | None:
            values = [item[key] for item in self.measurements if item["step"] == step and item[key] is not None]
            return round(statistics.median(values), 3) if values else None

        steps = ["unchanged run", "changed run", "bare set, nothing changed", "bare set, after activity"]
        medians = {step: {key: median(step, key) for key in ("wall_seconds", "cpu_seconds", "server_cpu_seconds",
                                                              "repository_bytes_added")} for step in steps}
        bare_dumps = [item["pg_dump"] for item in self.measurements if item["step"].startswith("bare set, ") and item["round"]]
        medians["bare pg_dump -Fc"] = {key: round(statistics.median(item[key] for item in bare_dumps), 3)
                                       if all(item[key] is not None for item in bare_dumps) else None
                                       for key in ("wall_seconds", "cpu_seconds", "server_cpu_seconds")}
        medians["bare pg_dump -Fc"]["repository_bytes_added"] = None
        medians["restic snapshots"] = {"wall_seconds": round(statistics.median(wall for wall, _ in self.restic_floor), 3),
                                       "cpu_seconds": round(statistics.median(cpu for _, cpu in self.restic_floor), 3),
                                       "server_cpu_seconds": None, "repository_bytes_added": None}

        def ratio(step: str, bare: str, key: str) -> float | None:
            ours, theirs = medians[step][key], medians[bare][key]
            return round(ours / theirs, 3) if ours is not None and theirs else None

        ratios = {f"{step} vs {bare}": {key: ratio(step, bare, key) for key in ("wall_seconds", "cpu_seconds",
                                                                                 "repository_bytes_added")}
                  for step, bare in (("unchanged run", "bare set, nothing changed"),
                                     ("changed run", "bare set, after activity"),
                                     ("changed run", "bare pg_dump -Fc"))}
        interval = longest_gap(SCHEDULE)
        derived_max_rpo = max_rpo(SCHEDULE, "")

        def share(step: str, with_server: bool) -> float | None:
            cpu, server = medians[step]["cpu_seconds"], medians[step]["server_cpu_seconds"]
            if cpu is None or (with_server and server is None):
                return None
            return round((cpu + (server if with_server else 0.0)) / interval.total_seconds(), 5)

        changed_wall = medians["changed run"]["wall_seconds"]
        changed_written = statistics.median(item["uploads_bytes_written"] for item in activities) if activities else None
        figures = {
            "share_of_one_core_every_run_unchanged": share("unchanged run", False),
            "share_of_one_core_every_run_changed": share("changed run", False),
            "share_of_one_core_every_run_unchanged_with_postgresql": share("unchanged run", True),
            "share_of_one_core_every_run_changed_with_postgresql": share("changed run", True),
            "goal_share_of_one_core": GOAL_SHARE,
            "schedule": SCHEDULE, "interval_seconds": interval.total_seconds(),
            "recovery_point_worst_seconds": None if changed_wall is None else round(interval.total_seconds() + changed_wall, 1),
            "max_rpo_default_seconds": derived_max_rpo.total_seconds(),
            "changed_run_bytes_added_vs_uploads_written": None if not changed_written or
            medians["changed run"]["repository_bytes_added"] is None
            else round(medians["changed run"]["repository_bytes_added"] / changed_written, 3),
            "changed_run_bytes_added_vs_set": None if medians["changed run"]["repository_bytes_added"] is None
            else round(medians["changed run"]["repository_bytes_added"] / data["uploads_bytes"], 4),
        }
        restic_version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
        code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "worker/"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return {
            "figures": figures,
            "medians": medians,
            "ratios": ratios,
            "status": statuses,
            "problems": self.problems,
            "notes": self.notes,
            "activity": {"idle_before_unchanged_run": IDLE, "typical_15_minutes": ACTIVITY, "per_round": activities},
            "data": {**data, "database": DATABASE, "uploads_mb": None if self.args.reference else self.args.uploads_mb,
                     "reference": self.args.reference},
            "compression": self.args.compression or "the product's default (-Z6)",
            "measurements": self.measurements,
            "measured": {"started": started.isoformat(timespec="seconds"),
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "runs": self.args.runs, "code": code + (" (worker/ modified)" if dirty else ""),
                         "restic": restic_version, "host": platform.node(), "cpus": os.cpu_count(),
                         "postgresql_cpu_sampled": self.postmaster is not None,
                         "load_start": load_start, "load_end": loadavg()},
        }
