"""The chaos soak (issue 25): sets every minute under random faults, then every good set restored.

    .venv/bin/python -m bench.soak [--minutes 60] [--seed N] [--rate 20] [--ci]

Real services on this machine (bench/soak/stack.py): a private PostgreSQL holding a TMA Cloud database
under a steady write load (bench/soak/load.py), two tma-backup workers on two hosts and one beat taking
a whole set (dump, uploads, .env) into a restic repository on a SeaweedFS S3 server every minute
(BACKUP_SCHEDULE="* * * * *"), with drills and repository maintenance on short schedules too. Faults
are injected at random moments drawn from a seeded generator, each logged with its times
(bench/soak/faults.py). At the end, with the faults stopped, repair must converge and every set the
product reported good (its runs' results, `repository list`, `status`) is restored from the repository
into a scratch database and folder and compared with what was live at its snapshot
(bench/soak/verify.py). Writes soak.json, soak.md and soak.png (bench/soak/report.py) into --out and
exits 1 when a set reported good is not restorable or repair does not converge.

`--ci` is the 3-minute mode (under two minutes of faults, at a high rate and with short outages):
tests/test_soak_smoke.py runs it. See bench/README.md, "The chaos soak".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.proc import exclusive, export_code
from bench.soak import logs as soak_logs
from bench.soak import report as soak_report
from bench.soak.faults import KINDS, Chaos
from bench.soak.load import Load, Record
from bench.soak.stack import DATABASE, Stack
from bench.soak.verify import SetCheck, converge, epoch, parts, verify_set, wait_for_idle

BENCH = Path(__file__).resolve().parent.parent  # bench/
LEASE = 9  # BACKUP_LOCK_TIMEOUT: production's default
KEEP_PREVIOUS = 1


class Interrupted(KeyboardInterrupt):
    pass


def _on_signal(number: int, frame: Any) -> None:
    raise Interrupted(f"signal {number}")


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


def product_settings(args: argparse.Namespace) -> dict[str, str]:
    """What the soak sets for the product: sets every minute, drills and maintenance on short schedules,
    production's defaults for the rest (the lock's lease, retries, retention)."""
    return {
        "BACKUP_SCHEDULE": "* * * * *",
        "BACKUP_DRILL_SCHEDULE": args.drill_schedule,
        "BACKUP_DRILL_FROM_REPOSITORY": "true",
        "REPOSITORY_MAINTENANCE_SCHEDULE": args.maintenance_schedule,
        "REPOSITORY_CHECK_SUBSET": "10%",
        # restic stopped after this long without progress (production: 300 s): the S3 server is SIGSTOPped
        # for up to 150 s, so that the watchdog acts within the soak, not only the server's return.
        "REPOSITORY_STALL_TIMEOUT": str(args.stall_timeout),
        "BACKUP_LOCK_TIMEOUT": str(LEASE),
        "RESTORE_KEEP_PREVIOUS": str(KEEP_PREVIOUS),
        "REPOSITORY_LOCK_WAIT": "900",
    }


def snapshot_code(revision: str, target: Path) -> dict[str, str] | None:
    """The code under test, as bench.run takes it (bench/base.py): worker/, tasks/ and beat_schedule.py
    at `revision`, put first on PYTHONPATH. None with `worktree` (the working tree as it is)."""
    repo = BENCH.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if revision == "worktree":
        return None
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    export_code(repo, commit, target)
    return {"commit": commit, "head": head}


@dataclass
class Sampler:
    """The machine's load average every 15 s (other developers' tests run here too)."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self.stop.wait(15)


@dataclass
class Monitor:
    """What `status` and `repository list` report while the soak runs (sets reported good)."""

    stack: Stack
    interval: float
    listed: dict[str, str] = field(default_factory=dict)  # timestamp → first seen as "listing" or "status"
    uploads: dict[str, str | None] = field(default_factory=dict)  # timestamp → its uploads part, as last listed
    status: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        listing = self.stack.cli("repository", "list", "--json", timeout=300)
        if listing.returncode == 0:
            for line in listing.stdout.splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if item.get("database") == DATABASE and item.get("timestamp"):
                    self.listed.setdefault(item["timestamp"], "repository list")
                    self.uploads[item["timestamp"]] = item.get("uploads")
        status = self.stack.cli("status", "--json", timeout=300)
        try:
            facts = json.loads(status.stdout)
        except ValueError:
            facts = {}
        repository = facts.get("repository") or {}
        if repository.get("timestamp"):
            self.listed.setdefault(repository["timestamp"], "status")
        self.status.append({"t": round(time.time(), 1), "exit": status.returncode, "ok": facts.get("ok"),
                            "set": repository.get("timestamp"), "problems": (facts.get("problems") or [])[:4]})


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.stack = Stack(work / "stack", None, product_settings(args))
        self.record = Record(work / "load.jsonl")
        self.load: Load | None = None
        self.chaos: Chaos | None = None
        self.sampler = Sampler()
        self.monitor: Monitor | None = None
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.times: dict[str, float] = {}
        self.keeps_all = True
        self.forgotten: list[str] = []

    def run(self) -> dict[str, Any]:
        args, stack = self.args, self.stack
        self.times["begin"] = time.time()
        machine = machine_info()
        say(f"machine: {machine['nproc']} cores, load {machine['uptime_start']}; seed {args.seed}, "
            f"{args.minutes:g} min of faults at {args.rate:g}/h")
        code = snapshot_code(args.code, self.work / "code")
        stack.code = self.work / "code" if code else None
        machine["code"] = code or {"commit": "worktree"}
        settings_source = (stack.code or BENCH.parent) / "worker" / "settings.py"
        # With time-based retention (REPOSITORY_KEEP_WITHIN, default a day) no set of the soak is forgotten;
        # older code keeps the newest set of each day only, and the sets it forgot cannot be restored.
        self.keeps_all = "REPOSITORY_KEEP_WITHIN" in settings_source.read_text()
        self._start_thread(self.sampler.run, "sampler")
        say("starting PostgreSQL, Redis and the S3 server")
        stack.start_services()
        stack.create_database(users=args.users, files=args.files)
        self._bulk_audit(args.audit_rows)
        self._old_trash(args.old_trash, args.minutes * 60 + args.settle)
        init = stack.cli("repository", "init", broker=False, timeout=300)
        if init.returncode != 0:
            raise RuntimeError(f"repository init failed: {init.stderr.strip()[-500:]}")
        stack.mount_backup_dirs()
        say("starting two workers and beat")
        stack.start_workers()
        stack.start_beat()
        self.load = Load(lambda: stack.connect(autocommit=True, connect_timeout=5), stack.upload_dir, self.record,
                         seed=self.rng.randrange(2**32), interval=args.tick)
        self.load.start()
        self.monitor = Monitor(stack, args.monitor_interval)
        self._start_thread(self.monitor.run, "monitor")
        self.chaos = Chaos(stack, self.load, self.record, random.Random(self.rng.randrange(2**32)), args.rate,
                           args.kinds, self.work / "faults.jsonl", scale=args.scale, lease=LEASE)
        self.times["faults_from"] = time.time()
        until = self.times["faults_from"] + args.minutes * 60
        say(f"faults until {time.strftime('%H:%M:%S', time.localtime(until))}")
        self.chaos.run(until, first_after=args.first_fault, steady=args.ci)
        self.chaos.stopping.wait(max(0.0, until - time.time()))
        say(f"faults stopped ({len(self.chaos.faults)} injected); recovering the running ones")
        self.chaos.stop()
        self.times["faults_to"] = time.time()
        healed = self.chaos.heal()
        if healed:
            say(f"healed: {healed}")
        self._settle()
        say("stopping the load and beat; waiting for running work to end")
        self.load.stop()
        self.monitor.stop.set()
        assert stack.beat is not None
        stack.beat.terminate()
        held = wait_for_idle(stack, 600)
        if held:
            self.errors.append(f"locks still held 10 minutes after beat stopped: {held}")
        self.times["end_of_work"] = time.time()
        say("repair, and what it must leave")
        convergence = converge(stack, KEEP_PREVIOUS)
        self.monitor.poll()
        runs = self.runs()
        checks = self.verify(runs)
        self.times["end"] = time.time()
        machine["uptime_end"] = uptime()
        return self.results(machine, runs, checks, convergence)

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _bulk_audit(self, rows: int) -> None:
        """A database of some size: older audit rows, as a deployment that has run for a while has."""
        with self.stack.connect(autocommit=True) as connection:
            connection.execute(
                "INSERT INTO audit_log (user_id, action, details, at) SELECT (g %% 50) + 1, 'file.view',"
                " jsonb_build_object('ip', '10.1.' || (g %% 250) || '.' || (g %% 199), 'agent', repeat('Mozilla/5.0 ', 4)),"
                " now() - (g || ' minutes')::interval FROM generate_series(1, %s) g", (rows,))

    def _old_trash(self, rows: int, seconds: float) -> None:
        """Uploads put in the trash about 15 days before the soak, spread so that TMA Cloud's purge (15
        days after) falls due at a steady pace while the soak runs (bench/soak/load.py purges them)."""
        with self.stack.connect(autocommit=True) as connection:
            connection.execute(
                "UPDATE files SET deleted_at = now() - interval '15 days' + random() * %s * interval '1 second'"
                " WHERE id IN (SELECT id FROM files WHERE type = 'file' AND path IS NOT NULL AND deleted_at IS NULL"
                " ORDER BY id LIMIT %s)", (seconds, rows))

    def logs(self) -> tuple[list[soak_logs.TaskEvent], list[float]]:
        events = []
        for host in self.stack.hosts:
            events += soak_logs.task_events(host.folder / "worker.log", host.name)
        assert self.stack.beat is not None
        return events, soak_logs.beat_sends(self.stack.beat.log_path)

    def runs(self) -> list[soak_logs.Run]:
        return soak_logs.runs(self.logs()[0])

    def _settle(self) -> None:
        """After the last fault, wait for the next good set (up to --settle seconds): the recovery time of
        the last faults, and a last set made with everything healthy."""
        deadline = time.time() + self.args.settle
        since = self.times["faults_to"]
        while time.time() < deadline:
            if any(run.outcome == "good" and run.received_at >= since for run in self.runs()):
                say("a good set after the last fault")
                return
            time.sleep(5)
        self.errors.append(f"no good set within {self.args.settle:.0f} s after the faults stopped")

    def verify(self, runs: list[soak_logs.Run]) -> list[SetCheck]:
        assert self.monitor is not None
        present = parts(self.stack)
        reported: dict[str, list[str]] = {}
        for run in runs:
            if run.outcome == "good" and run.timestamp:
                reported.setdefault(run.timestamp, []).append("run result")
        for timestamp, source in self.monitor.listed.items():
            reported.setdefault(timestamp, []).append(source)
        windows: dict[str, soak_logs.Run] = {run.timestamp: run for run in runs if run.timestamp}
        scratch = self.work / "verify"
        scratch.mkdir(exist_ok=True)
        checks = []
        say(f"verifying {len(reported)} set(s) reported good")
        self.forgotten = sorted(timestamp for timestamp in reported if timestamp not in present and not self.keeps_all
                                and any(other[:8] == timestamp[:8] and other > timestamp for other in present))
        for timestamp in self.forgotten:
            reported.pop(timestamp)
        if self.forgotten:
            say(f"{len(self.forgotten)} set(s) reported good were forgotten by the calendar retention of the code "
                "under test (no REPOSITORY_KEEP_WITHIN): not verified")
        for number, timestamp in enumerate(sorted(reported), 1):
            found = windows.get(timestamp)
            start = epoch(timestamp) - 1
            end = (found.dump_done or found.ended_at) if found else None
            window = (start, end if end is not None else start + 600)
            # A set the product lists without an uploads part (its run said the capture failed) is what the
            # product reports: a database part. Only that is restored and compared.
            database_only = (self.monitor.uploads.get(timestamp, "") is None
                             and "uploads" not in present.get(timestamp, {}))
            check = verify_set(self.stack, self.record, timestamp, present.get(timestamp), window,
                               sorted(set(reported[timestamp])), scratch, database_only)
            checks.append(check)
            verdict = "restorable" if check.restorable else f"NOT RESTORABLE: {check.problems}"
            say(f"  {number}/{len(reported)} {timestamp}: tick {check.tick}, {check.files} files: {verdict}")
        return checks

    def results(self, machine: dict[str, Any], runs: list[soak_logs.Run], checks: list[SetCheck],
                convergence: Any) -> dict[str, Any]:
        assert self.chaos is not None and self.load is not None
        events, sends = self.logs()
        origin = self.times["faults_from"]
        loads = [value for _, value in self.sampler.samples]
        machine["load_mean"] = round(sum(loads) / len(loads), 2) if loads else None
        machine["load_max"] = round(max(loads), 2) if loads else None
        machine["load_samples"] = [[round(moment - origin, 1), value] for moment, value in self.sampler.samples]
        return {
            "mode": "ci" if self.args.ci else "reference",
            "seed": self.args.seed,
            "rate_per_hour": self.args.rate,
            "fault_minutes": self.args.minutes,
            "kinds": self.args.kinds,
            "settings": product_settings(self.args),
            "machine": machine,
            "times": {key: round(value - origin, 1) for key, value in self.times.items()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.times["begin"])),
            "origin": origin,
            "beat_sends": len(sends),
            "runs": [run.describe() for run in runs],
            "faults": [fault.describe(origin) for fault in self.chaos.faults],
            "chaos_notes": self.chaos.notes,
            "activities": {name: item.describe() for name, item in soak_logs.activities(events).items()},
            "sets": [check.describe() for check in checks],
            "forgotten_by_retention": self.forgotten,
            "convergence": convergence.describe(),
            "load": {"ticks": self.load.committed, "states": len(self.record.states), "blobs": len(self.record.blobs),
                     "purged": len(self.record.purged), "errors": self.load.errors, "stats": self.load.stats,
                     "conflicts": self.record.conflicts},
            "status_polls": self.monitor.status if self.monitor else [],
            "errors": self.errors,
        }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import celery

    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "celery": celery.__version__, "uptime_start": uptime(),
            "restic": subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip(),
            "postgres": subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60, help="minutes of faults (default 60)")
    parser.add_argument("--seed", type=int, help="the fault and load generators' seed (default: random, printed)")
    parser.add_argument("--rate", type=float, default=20, help="faults per hour (default 20)")
    parser.add_argument("--ci", action="store_true",
                        help="the 3-minute mode: 1.6 min of faults at 90/h with short outages; results in "
                             "bench/work/soak-ci/ unless --out")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"the fault kinds to draw from (default all: {','.join(KINDS)})")
    parser.add_argument("--code", default="HEAD", help="git revision of worker/ and tasks/ to run (default HEAD), "
                                                       "or 'worktree'")
    parser.add_argument("--out", type=Path, help="where soak.json, soak.md and soak.png go (default bench/results/)")
    parser.add_argument("--work-dir", type=Path, default=BENCH / "work", help="the soak's folders (default bench/work/)")
    parser.add_argument("--keep-work", action="store_true", help="keep the soak's folders (logs, journals) afterwards")
    parser.add_argument("--tick", type=float, default=1.0, help="seconds between two ticks of the load (default 1)")
    parser.add_argument("--settle", type=float, help="seconds to wait for a good set after the faults stop (default 300)")
    args = parser.parse_args(argv)
    args.seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    args.kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    args.scale, args.first_fault, args.monitor_interval = 1.0, 45.0, 180.0
    args.users, args.files, args.audit_rows, args.old_trash = 400, 600, 20000, 240
    args.drill_schedule, args.maintenance_schedule, args.stall_timeout = "*/4 * * * *", "*/9 * * * *", 60
    if args.ci:
        args.minutes = 1.6 if args.minutes == 60 else args.minutes
        args.rate = 90 if args.rate == 20 else args.rate
        args.scale, args.first_fault, args.monitor_interval = 0.3, 15.0, 45.0
        args.users, args.files, args.audit_rows, args.old_trash = 100, 160, 2000, 40
        args.drill_schedule, args.maintenance_schedule, args.stall_timeout = "*/2 * * * *", "*/2 * * * *", 20
    args.settle = args.settle if args.settle is not None else (80 if args.ci else 300)
    args.out = args.out or (args.work_dir / "soak-ci" if args.ci else BENCH / "results")
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("[ERROR] the soak mounts a tmpfs for each BACKUP_DIR: run it as root", file=sys.stderr)
        return 2
    lock = exclusive(args.work_dir, ".soak.lock")
    if lock is None:
        print("[ERROR] another soak is running (bench/work/.soak.lock)", file=sys.stderr)
        return 2
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _on_signal)
    work = args.work_dir / f"soak-{os.getpid()}"
    soak = Soak(args, work)
    broke = True
    try:
        results = soak.run()
        broke = False
    except KeyboardInterrupt:
        print("[ERROR] interrupted: cleaning up", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (set-up failed: nothing to report but why)
        traceback.print_exc()
        print(f"[ERROR] the soak could not run: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        soak.sampler.stop.set()
        if soak.monitor is not None:
            soak.monitor.stop.set()
        if soak.chaos is not None:
            soak.chaos.stopping.set()
        if soak.load is not None:
            soak.load._stop.set()
        soak.stack.stop()
        kept = args.keep_work or broke
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[INFO] the soak's folders are kept in {work}", file=sys.stderr)
    summary = soak_report.write(args.out, results)
    print(summary)
    print(f"written: {args.out}/soak.json, soak.md, soak.png")
    failed = results["summary"]["not_restorable"] or not results["convergence"]["converged"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
