"""tma-backup against the bare PostgreSQL tools, side by side in one run (issue 6).

    .venv/bin/python -m bench.run [--size-mb 1200] [--runs 3] [--quick]

a. the seed's backup with bare tools; b. the tma-backup chain through a real worker and Redis, same
compression; c. tma-backup's fastest safe settings; d. restore; e. docker mode; f. eight databases with one
worker process vs two; g. the off-site restic repository; h. the vault (`--only repository` or `--only vault`
runs g. or h. alone, merges its figures into the existing results and writes them alone as
repository.* or vault.*). Medians of --runs runs, interleaved round by round so that load from elsewhere on
the machine falls on every variant alike. Writes latest.json / latest.md / latest.png (bench/results/, or
bench/work/quick/ with --quick) and prints the table. Everything it creates (databases, files, worker
processes, its Redis database) is removed at the end, also when interrupted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from psycopg import sql

from bench import report
from bench.base import BENCH, FAST_MODES, SEED_MODE, _first_line, say, warn
from bench.churn import SCENARIOS
from bench.generate import Server, default_name
from bench.proc import exclusive, run
from bench.sections import DockerSection, FleetSection, RestoreSection
from bench.vault import VaultSection


class Interrupted(KeyboardInterrupt):
    pass


def _on_signal(number: int, frame: Any) -> None:
    raise Interrupted(f"signal {number}")


def machine_info(server: Server) -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with server.connect() as connection:
        server_version = connection.execute("SHOW server_version").fetchone()[0]
    import celery

    return {
        "nproc": int(nproc) if (nproc := _first_line(["nproc"])).isdigit() else os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "pg_dump": _first_line(["pg_dump", "--version"]),
        "pg_restore": _first_line(["pg_restore", "--version"]),
        "server_version": server_version,
        "loadavg_start": " ".join(f"{value:.2f}" for value in os.getloadavg()),
    }


# --only: each section's measurements (by key prefix), its letter and its details' key in the results.
SECTIONS = {"repository": ("repo_", "g", "repository"), "vault": ("vault_", "h", "vault")}


class Bench(RestoreSection, DockerSection, FleetSection, VaultSection):
    """The whole run: a, b and c (BenchBase), d, e and f (bench.sections), g (bench.repository), h
    (bench.vault), then the results. With `--only repository` or `--only vault`, g or h alone."""

    def measure(self) -> dict[str, Any]:
        args = self.args
        machine = machine_info(self.server)
        say(f"machine: {machine['nproc']} cores ({machine['cpu']}), {machine['mem_gib']} GiB, {machine['pg_dump']}, "
            f"server {machine['server_version']}, load {machine['loadavg_start']}")
        self.register()  # with --only too: the other sections' labels, for the merged table and chart
        self.work.mkdir(mode=0o700, parents=True, exist_ok=True)
        machine["code"] = self.snapshot_code()
        say(f"code under test: {machine['code']['source']} ({machine['code']['commit'][:12]})")
        self.claim_redis()
        self.drop_leftovers()
        reference, db_size = self.reference(args.name or default_name(args.size_mb), args.size_mb)
        say(f"warming the cache: pg_dump -Fc -Z0 of {reference} to /dev/null")
        run(["pg_dump", "-Fc", "--compress=0", "--no-sync", "-f", "/dev/null", reference], self.server.tool_env())
        if not args.only:
            self.sections_a_to_f(reference)
        if args.only in (None, "repository"):
            self.repository_section(reference)
        if args.only in (None, "vault"):
            self.vault_section(reference)
        machine["loadavg_end"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
        return self.results(machine, reference, db_size)

    def sections_a_to_f(self, reference: str) -> None:
        args = self.args
        modes = [SEED_MODE, *FAST_MODES]
        workers = {mode.key: self.worker(mode.key, mode.settings) for mode in modes}
        refused = self.start_workers(list(workers.values()))
        for mode in modes:
            item = self.measurements[f"chain_{mode.key}"]
            if mode.key in refused:
                if mode.optional:
                    item.na = f"this build refuses {mode.settings}: {refused[mode.key]}"[:300]
                else:
                    item.errors.append(refused[mode.key])
                self.stop_worker(workers.pop(mode.key))
        last_seed_backup: Path | None = None
        for number in range(args.runs):
            say(f"backup round {number + 1}/{args.runs}")
            self.bare_backup(reference)
            for mode in modes:
                if mode.key in workers:
                    keep = mode is SEED_MODE and number == args.runs - 1
                    chained = self.chain_backup(self.measurements[f"chain_{mode.key}"], workers[mode.key],
                                                reference, keep=keep)
                    if chained and keep:
                        last_seed_backup = Path(chained.summary["backup"])
        for key in [key for key in workers if key != SEED_MODE.key]:
            self.stop_worker(workers.pop(key))

        self.restore_section(reference, last_seed_backup, workers.get(SEED_MODE.key))
        if SEED_MODE.key in workers:
            self.stop_worker(workers.pop(SEED_MODE.key))
        self.docker_section(args.size_mb)
        self.fleet_section(reference, args.size_mb)

    def paired(self) -> dict[str, Any]:
        """The same ratios round by round (each round's variants ran minutes apart, under the same load
        from elsewhere), and their medians: steadier than ratios of medians on a busy machine."""
        pairs = {"chain_vs_bare": ("chain_z6", "bare_seed"), "restore_vs_seed": ("restore_tma", "restore_seed"),
                 "docker_stream_vs_exec": ("docker_exec", "docker_tma"), "fleet_2w_vs_1w": ("fleet_1w", "fleet_2w"),
                 "fleet_bare_2_vs_1": ("fleet_bare_1", "fleet_bare_2")}
        pairs.update({f"fast_vs_seed[{mode.key}]": ("bare_seed", f"chain_{mode.key}") for mode in FAST_MODES})
        found = {}
        for name, (top, bottom) in pairs.items():
            above, below = self.measurements[top], self.measurements[bottom]
            if above.walls and len(above.walls) == len(below.walls) and not above.errors and not below.errors:
                rounds = [round(x / y, 3) for x, y in zip(above.walls, below.walls, strict=True)]
                found[name] = {"rounds": rounds, "median": round(statistics.median(rounds), 3)}
        return found

    def results(self, machine: dict[str, Any], reference: str, db_size: int) -> dict[str, Any]:
        common = {
            "database": reference,
            "quick": self.args.quick,
            "runs": self.args.runs,
            "machine": machine,
            "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "failures": self.failures,
            "notes": self.notes,
            "medians": {key: {"wall_s": None if item.wall is None else round(item.wall, 3), "bytes": item.size}
                        for key, item in self.measurements.items()},
        }
        sections = {**self.repository_results(), **self.vault_results()}
        for name in ("repository", "vault"):  # where and when g. and h. were measured (kept apart when merged)
            if name in sections:
                sections[name]["measured"] = {"database": reference, "db_size_bytes": db_size,
                                              **{key: common[key] for key in ("runs", "finished_at", "quick")},
                                              "machine": machine}
        paired = {**self.repository_paired(), **self.vault_paired()}
        if self.args.only:
            return {**sections, "paired": paired, "db_size_bytes": db_size, **common}
        return {**self.results_a_to_f(db_size), **sections, **common, "paired": {**self.paired(), **paired}}

    def results_a_to_f(self, db_size: int) -> dict[str, Any]:
        m = self.measurements
        fast = [m[f"chain_{mode.key}"] for mode in FAST_MODES if m[f"chain_{mode.key}"].wall is not None]
        seed_size = m["bare_seed"].size
        no_bigger = [item for item in fast if seed_size is not None and item.size is not None and item.size <= seed_size]
        pick = min(no_bigger or fast, key=lambda item: item.wall or 0.0, default=None)
        rss = [extra["worker_rss_growth_mb"] for extra in m["docker_tma"].extra]
        host_rss = [extra["worker_rss_growth_mb"] for extra in m[f"chain_{SEED_MODE.key}"].extra]
        if pick is not None and not no_bigger:
            self.notes.append("no fast mode made a file no bigger than the seed's: the fastest "
                              f"({pick.key.removeprefix('chain_')}) is the one in fast_vs_seed and fast_size_vs_seed")
        return {
            "chain_vs_bare": report.ratio(m[f"chain_{SEED_MODE.key}"].wall, m["bare_seed"].wall),
            "fast_vs_seed": report.ratio(m["bare_seed"].wall, pick.wall if pick else None),
            "fast_size_vs_seed": report.ratio(pick.size if pick else None, seed_size),
            "restore_vs_seed": report.ratio(m["restore_tma"].wall, m["restore_seed"].wall),
            "docker_stream_vs_exec": report.ratio(m["docker_exec"].wall, m["docker_tma"].wall),
            "docker_worker_rss_growth_mb": round(statistics.median(rss), 1) if rss else None,
            "fleet_2w_vs_1w": report.ratio(m["fleet_1w"].wall, m["fleet_2w"].wall),
            "db_size_bytes": db_size,
            "fleet_bare_2_vs_1": report.ratio(m["fleet_bare_1"].wall, m["fleet_bare_2"].wall),
            "restore_vs_seed_without_its_checks": report.ratio(m["restore_tma"].wall, seed_restore_unchecked(m["restore_seed"])),
            "fast_mode": pick.key.removeprefix("chain_") if pick else None,
            "fast_modes": {item.key.removeprefix("chain_"): {
                "vs_seed_wall": report.ratio(m["bare_seed"].wall, item.wall),
                "vs_seed_size": report.ratio(item.size, seed_size)} for item in fast},
            "host_worker_rss_growth_mb": round(statistics.median(host_rss), 1) if host_rss else None,
        }

    def keep_logs(self) -> None:
        """When something failed, the workers' logs survive the clean-up in bench/work/failure-logs/."""
        folder = self.work.parent / "failure-logs"
        shutil.rmtree(folder, ignore_errors=True)
        if not self.failures:
            return
        for log in self.work.glob("*/worker.log"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, folder / f"{log.parent.name}.log")
        if folder.exists():
            warn(f"worker logs kept in {folder}")

    def cleanup(self) -> None:
        self.stop_s3()
        for worker in list(self.workers):
            try:
                worker.stop()
            except Exception as error:  # noqa: BLE001 (clean up the rest regardless)
                warn(f"stopping worker {worker.key}: {error}")
        self.workers.clear()
        try:
            self.drop_leftovers()
            with self.server.connect(autocommit=True) as admin:
                for name in sorted(self.drop_at_end):
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except Exception as error:  # noqa: BLE001
            warn(f"dropping the benchmark's databases: {error}")
        if self.redis_claimed:
            try:
                redis.Redis.from_url(self.broker_url).flushdb()
            except Exception as error:  # noqa: BLE001
                warn(f"emptying {self.broker_url}: {error}")
        self.keep_logs()
        for name in self.containers:
            try:
                run(["docker", "rm", "-f", "-v", name], timeout=60)
            except Exception as error:  # noqa: BLE001
                warn(f"removing container {name}: {error}")
        shutil.rmtree(self.work, ignore_errors=True)


def seed_restore_unchecked(seed: report.Measurement) -> float | None:
    """The seed's restore walls less its validation laps (median): the figure without the file check."""
    walls = [wall - sum(seconds for step, seconds in steps.items() if step.startswith("validate"))
             for wall, steps in zip(seed.walls, seed.steps, strict=False)]
    return statistics.median(walls) if walls and len(walls) == len(seed.walls) else None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1200, help="reference database size on disk, MiB (default 1200)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a tiny database, 1 run each; exits 1 if any measured step fails")
    parser.add_argument("--name", help="reference database (default tma_bench_<size>mb, made by bench.generate)")
    parser.add_argument("--code", default="HEAD",
                        help="git revision of worker/ and tasks/ to measure (default HEAD), or 'worktree'")
    parser.add_argument("--redis-db", type=int, default=11, help="Redis database for the broker (default 11)")
    parser.add_argument("--work-dir", type=Path, default=BENCH / "work",
                        help="where dumps and worker folders go (default bench/work/)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/, with --quick bench/work/quick/)")
    parser.add_argument("--keep-databases", action="store_true", help="keep reference databases this run generated")
    parser.add_argument("--docker-image", help="e.: start a throw-away PostgreSQL container of this image "
                        "(e.g. tma-local/postgres:15) and measure docker mode against it")
    parser.add_argument("--docker-container", help="e.: or use this running PostgreSQL container "
                        "(or BENCH_DOCKER_CONTAINER; password in BENCH_DOCKER_PASSWORD)")
    parser.add_argument("--docker-port", type=int, default=55432, help="that container's port on 127.0.0.1")
    parser.add_argument("--only", choices=sorted(SECTIONS),
                        help="run only this section (g. repository, h. vault), merge its figures into the results "
                             "already in --out and write them alone as <section>.json/.md/.png")
    parser.add_argument("--churn", choices=sorted(SCENARIOS), default="nightly",
                        help="g. and h.: what a night changes before the second night's backup (bench/churn.py; "
                             "default nightly)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.runs = 12, 1
    if args.runs < 1 or args.size_mb < 1:
        parser.error("--runs and --size-mb must be at least 1")
    args.out = args.out or (args.work_dir / "quick" if args.quick else BENCH / "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    server = Server(os.environ.get("DB_HOST", "127.0.0.1"), int(os.environ.get("DB_PORT", "5432")),
                    os.environ.get("DB_USER", "postgres"), os.environ.get("DB_PASSWORD") or None)
    lock = exclusive(args.work_dir, ".bench.lock")
    if lock is None:
        print("[ERROR] another benchmark is running (bench/work/.bench.lock)", file=sys.stderr)
        return 2
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _on_signal)
    bench = Bench(args, server, args.work_dir / f"run-{os.getpid()}", f"redis://127.0.0.1:6379/{args.redis_db}")
    started = time.monotonic()
    try:
        results = bench.measure()
    except KeyboardInterrupt:
        print("[ERROR] interrupted: cleaning up", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (set-up failed: nothing to report but why)
        traceback.print_exc()
        print(f"[ERROR] the benchmark could not run: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        bench.cleanup()
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    section = SECTIONS.get(args.only or "")
    table = report.write(args.out, results, list(bench.measurements.values()),
                         merge=[key for key in bench.measurements if key.startswith(section[0])] if section else None,
                         section=(args.only, section[1], section[2]) if section else None)
    machine = results["machine"]
    print(f"machine: nproc {machine['nproc']}, {machine['cpu']}, {machine['pg_dump']}, server {machine['server_version']}")
    print(table)
    alone = f", {args.only}.json, {args.only}.md, {args.only}.png" if section else ""
    print(f"written: {args.out}/latest.json, latest.md, latest.png{alone} ({results['bench_seconds']:.0f} s)")
    if results["failures"]:
        print(f"[ERROR] {len(results['failures'])} measured step(s) failed:", file=sys.stderr)
        for failure in results["failures"]:
            print(f"[ERROR]   {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
