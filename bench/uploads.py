"""Issue 12's uploads figures: the set's uploads capture against the seed's `tar -czf`, and the whole
set's restore against the bare tools. Runs on its own (it shares nothing with bench.run):

    .venv/bin/python -m bench.uploads [--files N] [--size-mb M] [--rounds R] [--quick]

The uploads folder (incompressible random blobs, like TMA Cloud's AES-GCM files, named by a TMA-like
`files` table in a scratch database) lives in bench/work/uploads/ and is reused between invocations.
Results: bench/results/uploads.json and uploads.md (with --quick: bench/work/uploads/quick/). See
bench/UPLOADS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "uploads"
RESULTS = ROOT / "bench" / "results"
TMA_BACKUP = str(ROOT / ".venv" / "bin" / "tma-backup")
HOST, PORT, USER = os.environ.get("DB_HOST", "127.0.0.1"), os.environ.get("DB_PORT", "5432"), os.environ.get("DB_USER", "postgres")
TAG_OVERHEAD = 32  # TMA's AES-GCM: a 16-byte IV before the data and a 16-byte tag after it
EXTENSIONS = [".jpg", ".png", ".pdf", ".docx", ".mp4", ".zip", ".txt", ""]
CHUNK = 1 << 20

TARGETS = {"uploads_full_vs_tar": ("<=", 1.0), "uploads_incremental_vs_tar": ("<=", 0.10),
           "set_restore_vs_bare": ("<=", 1.2)}


def say(message: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", flush=True)


def loadavg() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def connect(database: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(host=HOST, port=PORT, user=USER, dbname=database, autocommit=autocommit)


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, stdout: Any = subprocess.PIPE,
        what: str = "") -> subprocess.CompletedProcess[bytes]:
    process = subprocess.run(argv, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if process.returncode != 0:
        out = (process.stdout or b"").decode("utf-8", "replace") if stdout is subprocess.PIPE else ""
        raise SystemExit(f"[ERROR] {what or argv[0]} exited {process.returncode}: "
                         f"{(out + process.stderr.decode('utf-8', 'replace')).strip()[-1500:]}")
    return process


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


# ── the data ─────────────────────────────────────────────────────────────────────────────────────────


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            piece = min(left, CHUNK)
            handle.write(os.urandom(piece))
            left -= piece


def sizes_for(count: int, total: int, rng: random.Random) -> list[int]:
    """Lognormal sizes (sigma 1.2: from a few KB to a few MB) scaled to `total` on-disk bytes."""
    raw = [rng.lognormvariate(0.0, 1.2) for _ in range(count)]
    scale = total / sum(raw)
    return [max(TAG_OVERHEAD + 1, int(value * scale)) for value in raw]


class Data:
    def __init__(self, base: Path, database: str, files: int, size_mb: int):
        self.base, self.database, self.files, self.size_mb = base, database, files, size_mb
        self.folder = base / "uploads"
        self.marker = base / "generated.json"

    def ready(self) -> bool:
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        if (marker.get("files"), marker.get("size_mb"), marker.get("database")) != (self.files, self.size_mb, self.database):
            return False
        try:
            with connect(self.database) as connection:
                rows = connection.execute("SELECT count(*) FROM files WHERE type = 'file'").fetchone()[0]
        except psycopg.Error:
            return False
        return rows == marker.get("rows") and sum(1 for _ in os.scandir(self.folder)) == rows

    def generate(self) -> None:
        say(f"generating {self.files} files, {self.size_mb} MiB, in {self.folder} (database {self.database})")
        self.marker.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        with connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        rng = random.Random(12)
        sizes = sizes_for(self.files, self.size_mb * 1024 * 1024, rng)
        rows = []
        for index, on_disk in enumerate(sizes):
            ext = EXTENSIONS[index % len(EXTENSIONS)]
            file_id = secrets.token_hex(8)
            rows.append((file_id, f"file-{index}{ext}", "file", on_disk - TAG_OVERHEAD, f"{file_id}{ext}", None))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda row_size: write_random(self.folder / row_size[0][4], row_size[1]), zip(rows, sizes, strict=True)))
        say(f"  wrote {sum(sizes) / 1e9:.2f} GB in {time.monotonic() - started:.1f} s")
        with connect(self.database) as connection:
            connection.execute("CREATE TABLE files (id text PRIMARY KEY, name text, type text NOT NULL, size bigint,"
                               " path text, deleted_at timestamptz)")
            folders = [(secrets.token_hex(8), f"folder-{i}", "folder", None, None, None) for i in range(50)]
            trashed = rows[::500]  # a few rows in the trash: still references
            with connection.cursor().copy("COPY files (id, name, type, size, path, deleted_at) FROM STDIN") as copy:
                for row in rows + folders:
                    copy.write_row(row if row not in trashed else (*row[:5], datetime.now(timezone.utc)))
            connection.execute("VACUUM ANALYZE files")
        self.marker.write_text(json.dumps({"files": self.files, "size_mb": self.size_mb, "database": self.database,
                                           "rows": len(rows), "bytes": sum(sizes)}))

    def stats(self) -> tuple[int, int]:
        entries = [entry for entry in os.scandir(self.folder) if entry.is_file(follow_symlinks=False)]
        return len(entries), sum(entry.stat().st_size for entry in entries)

    def night(self, rng: random.Random, share: float = 0.01, new: int = 20) -> dict[str, int]:
        """One day of TMA Cloud: `share` of the files rewritten with new random bytes (same names, same
        sizes, as a key rotation or a replaced file would), and `new` files uploaded (rows added)."""
        entries = sorted(entry.name for entry in os.scandir(self.folder) if entry.is_file(follow_symlinks=False))
        changed = rng.sample(entries, max(1, int(len(entries) * share)))
        changed_bytes = 0
        for name in changed:
            size = (self.folder / name).stat().st_size
            write_random(self.folder / name, size)
            changed_bytes += size
        added_rows, added_bytes = [], 0
        for _ in range(new):
            file_id, size = secrets.token_hex(8), int(rng.lognormvariate(11.5, 1.0)) + TAG_OVERHEAD
            write_random(self.folder / f"{file_id}.bin", size)
            added_rows.append((file_id, f"new-{file_id}.bin", "file", size - TAG_OVERHEAD, f"{file_id}.bin", None))
            added_bytes += size
        with connect(self.database) as connection:
            with connection.cursor() as cursor:
                cursor.executemany("INSERT INTO files VALUES (%s, %s, %s, %s, %s, %s)", added_rows)
        marker = json.loads(self.marker.read_text())
        marker["rows"] += len(added_rows)
        self.marker.write_text(json.dumps(marker))
        return {"files_changed": len(changed), "bytes_changed": changed_bytes, "files_added": len(added_rows),
                "bytes_added": added_bytes}


# ── the two sides ────────────────────────────────────────────────────────────────────────────────────


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.base = WORK / ("quick" if self.quick else "full")
        self.run_dir = WORK / f"run-{os.getpid()}"
        self.database = "tma_bench_uploads_quick" if self.quick else "tma_bench_uploads"
        self.data = Data(self.base, self.database, args.files, args.size_mb)
        self.password = secrets.token_urlsafe(24)
        self.cache = self.run_dir / "cache"
        self.measurements: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.load_samples: list[list[float]] = []
        self.round = 0

    # environment
    def restic_env(self, repository: Path) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.run_dir),
                "XDG_CACHE_HOME": str(self.cache), "RESTIC_REPOSITORY": str(repository),
                "RESTIC_PASSWORD": self.password}

    def cli_env(self, repository: Path, backup_dir: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("DB_", "BACKUP_", "CELERY_", "RESTORE_", "PG", "WORKER_", "UPLOAD", "TMA_",
                                      "STORAGE_", "FILE_ENCRYPTION", "REPOSITORY_", "RESTIC_", "AWS_"))}
        env.update({"DB_HOST": HOST, "DB_PORT": PORT, "DB_USER": USER, "DB_MODE": "host", "DB_NAME": self.database,
                    "BACKUP_DIR": str(backup_dir), "BACKUP_REPOSITORY": str(repository),
                    "BACKUP_REPOSITORY_PASSWORD": self.password, "TMA_ENV_FILE": str(self.env_file),
                    "HOME": str(self.run_dir), "XDG_CACHE_HOME": str(self.cache)})
        return env

    def restic(self, repository: Path, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
        return run(["restic", *args], env=self.restic_env(repository), stdout=stdout, what=f"restic {args[0]}")

    def cli(self, args: list[str], repository: Path, backup_dir: Path) -> str:
        process = run([TMA_BACKUP, *args], env=self.cli_env(repository, backup_dir), cwd=self.run_dir,
                      what=f"tma-backup {args[0]}")
        return (process.stdout or b"").decode() + process.stderr.decode()

    # measurements
    def tar(self, label: str) -> float:
        target = self.run_dir / "uploads_backup.tar.gz"
        seconds, _ = timed(run, ["tar", "-czf", str(target), "uploads/"], cwd=self.base, what="tar")
        size = target.stat().st_size
        target.unlink()
        self.record(label, seconds, tar_bytes=size)
        return seconds

    def backup(self, label: str, repository: Path) -> dict[str, Any]:
        backup_dir = self.run_dir / "backups"
        backup_dir.mkdir(mode=0o700, exist_ok=True)
        time.sleep(1.1)  # one set a second: two runs never share a timestamp
        wall, output = timed(self.cli, ["backup"], repository, backup_dir)
        metas = sorted(backup_dir.rglob("*.meta"), key=lambda path: path.stat().st_mtime)
        from worker.archive.meta import read_meta  # the .meta is the run's record (its `uploads_*` fields)
        extra = read_meta(metas[-1]).extra
        if "uploads_seconds" not in extra:
            raise SystemExit(f"[ERROR] the backup recorded no uploads capture: {output.strip()[-800:]}")
        fields = {key: extra[key] for key in extra if key.startswith("uploads_")}
        self.record(label, float(extra["uploads_seconds"]), backup_wall=round(wall, 3),
                    **{key: fields[key] for key in ("uploads_files", "uploads_bytes", "uploads_bytes_added",
                                                    "uploads_missing", "uploads_unreferenced") if key in fields})
        for dump in list(backup_dir.rglob("*")):  # the local dumps are not what is measured
            if dump.is_file():
                dump.unlink()
        return fields

    def parts(self, repository: Path) -> tuple[str, str, str]:
        """The latest set's database part (id, dump path inside it) and uploads part (id)."""
        snapshots = json.loads(self.restic(repository, "snapshots", "--json").stdout or b"[]")
        newest: dict[str, dict[str, Any]] = {}
        for snapshot in sorted(snapshots, key=lambda item: item["time"]):
            part = next((tag[5:] for tag in snapshot.get("tags") or [] if tag.startswith("part:")), "database")
            newest[part] = snapshot
        database, uploads = newest["database"], newest["uploads"]
        dump = next(path for path in database["paths"] if path.endswith(".dump") or ".dump." in path)
        listing = self.restic(repository, "ls", "--json", database["id"]).stdout.decode().splitlines()
        names = [json.loads(line).get("path", "") for line in listing if '"struct_type":"node"' in line.replace(" ", "")]
        inside = next(name for name in names if name.endswith(Path(dump).name))
        return database["id"], inside, uploads["id"]

    def set_restore(self, label: str, repository: Path) -> float:
        backup_dir = self.run_dir / f"restore-{len(self.measurements)}"
        backup_dir.mkdir(mode=0o700)
        seconds, output = timed(self.cli, ["restore", "--from-repository", "latest", "--with-uploads", "--confirm",
                                           self.database], repository, backup_dir)
        previous = [entry for entry in self.data.folder.iterdir() if entry.name.startswith(".tma-")]
        report = [line.strip() for line in output.splitlines() if "Duration" in line or "Set    " in line]
        self.record(label, seconds, report=report)
        self.measurements[-1]["kept_aside"] = [entry.name for entry in previous]
        files, size = self.data.stats()
        if (files, size) != self.expected:
            raise SystemExit(f"[ERROR] after the set restore UPLOAD_DIR holds {files} files, {size} bytes;"
                             f" expected {self.expected}: {output[-800:]}")
        for entry in previous:  # untimed: the files the swap kept aside, and the kept database copy
            shutil.rmtree(entry, ignore_errors=True)
        self.drop_copies()
        shutil.rmtree(backup_dir)
        return seconds

    def bare_restore(self, label: str, repository: Path) -> float:
        lookup, (database_part, dump_path, uploads_part) = timed(self.parts, repository)
        target, dump = self.run_dir / "bare-uploads", self.run_dir / "bare.dump"
        fresh = f"{self.database}_bare"
        with connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(fresh)))
        started = time.monotonic()
        shares = {"restic_restore": timed(self.restic, repository, "restore", uploads_part, "--target", str(target))[0]}
        with open(dump, "wb") as handle:
            shares["restic_dump"] = timed(self.restic, repository, "dump", database_part, dump_path, stdout=handle)[0]
        shares["createdb"] = timed(run, ["createdb", "-h", HOST, "-p", PORT, "-U", USER, fresh], what="createdb")[0]
        shares["pg_restore"] = timed(run, ["pg_restore", "-h", HOST, "-p", PORT, "-U", USER, "-d", fresh, str(dump)],
                                     what="pg_restore")[0]
        seconds = time.monotonic() - started
        self.record(label, seconds, shares={key: round(value, 3) for key, value in shares.items()},
                    lookup=round(lookup, 3))
        restored = sum(1 for entry in os.scandir(target) if entry.is_file())
        if restored != self.expected[0]:
            raise SystemExit(f"[ERROR] bare restic restore gave {restored} files, expected {self.expected[0]}")
        shutil.rmtree(target)
        dump.unlink()
        with connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(fresh)))
        return seconds

    def drop_copies(self) -> None:
        with connect() as admin:
            for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                         (self.database.replace("_", r"\_") + r"\_\_%",)).fetchall():
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def record(self, label: str, seconds: float, **extra: Any) -> None:
        load = loadavg()
        self.load_samples.append(load)
        self.measurements.append({"step": label, "round": self.round, "seconds": round(seconds, 3), "load": load, **extra})
        say(f"  {label}: {seconds:.2f} s {extra if extra else ''} (load {load[0]})")

    # the whole run
    def main(self) -> dict[str, Any]:
        started = datetime.now(timezone.utc)
        load_start = loadavg()
        self.run_dir.mkdir(parents=True)
        self.cache.mkdir()
        self.base.mkdir(parents=True, exist_ok=True)
        self.env_file = self.run_dir / "tma-cloud.env"
        self.env_file.write_text(f"STORAGE_DRIVER=local\nUPLOAD_DIR={self.data.folder}\n"
                                 f"FILE_ENCRYPTION_KEY={secrets.token_hex(16)}\nNODE_ENV=production\n")
        self.env_file.chmod(0o600)
        self.round = 0
        if self.data.ready():
            say(f"reusing {self.data.folder}")
        else:
            self.data.generate()
        rng = random.Random(time.time())
        self.expected = self.data.stats()
        say(f"uploads: {self.expected[0]} files, {self.expected[1] / 1e9:.3f} GB; load {loadavg()}")
        # The folder is read once, untimed, so that neither side pays for the first read from disk.
        run(["tar", "-cf", "/dev/null", "uploads/"], cwd=self.base, what="warm-up tar")
        night_info = []
        for number in range(1, self.args.rounds + 1):
            self.round = number
            say(f"round {self.round}")
            repository = self.run_dir / f"repository-{self.round}"
            self.restic(repository, "init")
            first_tar_first = self.round % 2 == 1  # the sides take turns going first
            if first_tar_first:
                self.tar("tar")
                self.backup("capture_full", repository)
            else:
                self.backup("capture_full", repository)
                self.tar("tar")
            night_info.append(self.data.night(rng, new=20 if not self.quick else 2))
            self.expected = self.data.stats()
            self.backup("capture_incremental", repository)
            self.tar("tar")
            for pair in range(self.args.restore_pairs):
                order = [self.set_restore, self.bare_restore]
                if (self.round + pair) % 2 == 0:  # the sides take turns going first
                    order.reverse()
                for step in order:
                    # Untimed: what the previous restore left dirty (2 GB of files) is written back now,
                    # not during the next measurement, whichever side that is.
                    os.sync()
                    step("set_restore" if step == self.set_restore else "bare_restore", repository)
            shutil.rmtree(repository)
        return self.summarise(started, load_start, night_info)

    def summarise(self, started: datetime, load_start: list[float], nights: list[dict[str, int]]) -> dict[str, Any]:
        def steps(name: str, rnd: int | None = None) -> list[float]:
            return [item["seconds"] for item in self.measurements
                    if item["step"] == name and (rnd is None or item["round"] == rnd)]

        medians = {name: statistics.median(steps(name)) for name in
                   ("tar", "capture_full", "capture_incremental", "set_restore", "bare_restore")}
        figures = {"uploads_full_vs_tar": medians["capture_full"] / medians["tar"],
                   "uploads_incremental_vs_tar": medians["capture_incremental"] / medians["tar"],
                   "set_restore_vs_bare": medians["set_restore"] / medians["bare_restore"]}
        paired: dict[str, list[float]] = {key: [] for key in figures}
        for rnd in range(1, self.args.rounds + 1):
            tar = statistics.median(steps("tar", rnd))
            paired["uploads_full_vs_tar"].append(steps("capture_full", rnd)[0] / tar)
            paired["uploads_incremental_vs_tar"].append(steps("capture_incremental", rnd)[0] / tar)
            for ours, bare in zip(steps("set_restore", rnd), steps("bare_restore", rnd), strict=False):
                paired["set_restore_vs_bare"].append(ours / bare)
        bare_items = [item for item in self.measurements if item["step"] == "bare_restore"]
        with_lookup = statistics.median(item["seconds"] + item["lookup"] for item in bare_items)
        secondary = {"set_restore_vs_bare_with_lookup": round(medians["set_restore"] / with_lookup, 4),
                     "bare_restore_shares_median": {key: round(statistics.median(item["shares"][key] for item in bare_items), 3)
                                                    for key in bare_items[0]["shares"]},
                     "bare_lookup_median": round(statistics.median(item["lookup"] for item in bare_items), 3)}
        full = [item for item in self.measurements if item["step"] == "capture_full"]
        incremental = [item for item in self.measurements if item["step"] == "capture_incremental"]
        tars = [item for item in self.measurements if item["step"] == "tar"]
        restic_version = run(["restic", "version"]).stdout.decode().strip()
        code = run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.decode().strip()
        dirty = run(["git", "status", "--porcelain", "worker/"], cwd=ROOT).stdout.decode().strip()
        return {
            **{key: round(value, 4) for key, value in figures.items()},
            "targets": {key: f"{op} {value}" for key, (op, value) in TARGETS.items()},
            "paired": {key: {"rounds": [round(v, 4) for v in values], "median": round(statistics.median(values), 4)}
                       for key, values in paired.items()},
            **secondary,
            "medians_seconds": {key: round(value, 3) for key, value in medians.items()},
            "data": {"files": self.expected[0], "bytes": self.expected[1], "database": self.database,
                     "folder": str(self.data.folder.relative_to(ROOT)),
                     "tar_gz_bytes": statistics.median(item["tar_bytes"] for item in tars),
                     "first_bytes_added": [int(item.get("uploads_bytes_added", 0)) for item in full],
                     "second_bytes_added": [int(item.get("uploads_bytes_added", 0)) for item in incremental],
                     "night": nights},
            "measurements": self.measurements,
            "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                        "load_start": load_start, "load_end": loadavg(),
                        "load_1min_during": {"min": min(s[0] for s in self.load_samples),
                                             "median": statistics.median(s[0] for s in self.load_samples),
                                             "max": max(s[0] for s in self.load_samples)},
                        "restic": restic_version, "code": code + ("+worktree" if dirty else ""),
                        "started": started.isoformat(timespec="seconds"),
                        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "rounds": self.args.rounds, "restore_pairs": self.args.restore_pairs, "quick": self.quick, "notes": self.notes,
        }


def markdown(result: dict[str, Any]) -> str:
    data, medians, machine = result["data"], result["medians_seconds"], result["machine"]
    lines = [
        "# Uploads (issue 12)", "",
        f"{data['files']} files, {data['bytes'] / 1e9:.3f} GB of random bytes (tar.gz {data['tar_gz_bytes'] / 1e9:.3f} GB);"
        f" {result['rounds']} round(s); load average {machine['load_start']} at the start, {machine['load_end']} at the"
        f" end, 1-min {machine['load_1min_during']} during; {machine['nproc']} cores; code {machine['code']};"
        f" {machine['restic']}.", "",
        "| figure | value | within-round median | target |", "| --- | --- | --- | --- |",
    ]
    for key, (op, target) in TARGETS.items():
        met = result[key] <= target
        lines.append(f"| `{key}` | {result[key]:.3f} | {result['paired'][key]['median']:.3f} |"
                     f" {op} {target} {'✓' if met else '✗'} |")
    lines += ["", f"`set_restore_vs_bare_with_lookup` (the bare side also pays for finding the set's parts: `restic"
              f" snapshots` + `restic ls`, {result['bare_lookup_median']:.2f} s): {result['set_restore_vs_bare_with_lookup']:.3f}."
              f" Bare restore's shares (median s): {result['bare_restore_shares_median']}."]
    lines += ["", "| step | median seconds |", "| --- | --- |"]
    lines += [f"| {key} | {value:.2f} |" for key, value in medians.items()]
    lines += ["", f"Bytes added: first capture {data['first_bytes_added']}, second {data['second_bytes_added']};"
              f" the night: {data['night']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.uploads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=None, help="files in the uploads folder (default 24000)")
    parser.add_argument("--size-mb", type=int, default=None, help="the folder's size in MiB (default 2200)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    parser.add_argument("--restore-pairs", type=int, default=None,
                        help="set/bare restore pairs per round (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="200 files, 20 MiB, 1 round; results in bench/work/uploads/quick/")
    args = parser.parse_args(argv)
    args.files = args.files or (200 if args.quick else 24000)
    args.size_mb = args.size_mb or (20 if args.quick else 2200)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.restore_pairs = args.restore_pairs or (1 if args.quick else 3)
    for tool in ("restic", "tar", "pg_restore", "createdb"):
        if shutil.which(tool) is None:
            print(f"[ERROR] {tool} is not on PATH", file=sys.stderr)
            return 1
    free = shutil.disk_usage(WORK.parent if WORK.parent.exists() else ROOT).free
    if free < args.size_mb * 1024 * 1024 * 4:
        print(f"[ERROR] {free / 1e9:.1f} GB free; this run needs about 4 × {args.size_mb} MiB", file=sys.stderr)
        return 1
    bench = Bench(args)
    try:
        result = bench.main()
    finally:
        shutil.rmtree(bench.run_dir, ignore_errors=True)
        try:
            bench.drop_copies()
        except psycopg.Error:
            pass
    out = WORK / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "uploads.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "uploads.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
