"""The benchmark's section g: the off-site restic repository (issue 11).

- The offsite link against a bare `restic backup DUMP META` of the same files, both first-night uploads
  into a fresh repository, on a real S3 server (SeaweedFS `weed mini` on loopback) and on a local path.
- What the second night's set adds to the repository after a night of TMA Cloud's activity (bench/churn.py),
  over the first night's, for the default compression and for zstd-stream.
- `tma-backup restore --from-repository latest` into an empty BACKUP_DIR against `tma-backup restore FILE`
  of the same backup.

See bench/README.md, "g. The repository".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from psycopg import sql

from bench import churn
from bench.base import NIGHT_TARGET, BenchBase, say, warn
from bench.proc import StepFailed, run
from bench.report import Measurement
from bench.workers import ChainRun, Worker, clean_environment, run_chain

BUCKET = "tma-bench"
KINDS = ("s3", "local")
READ_BACK = "read-back (restic ls)"  # the offsite link's step that lists its set back (confirm_seconds)


def restic_available() -> str | None:
    """None if restic is installed, else why not."""
    return None if shutil.which("restic") else "restic is not installed (apt-get install restic)"


def tools_unavailable() -> str | None:
    """Why sections g. and h. cannot run here (no restic, no SeaweedFS), or None."""
    why = restic_available()
    if why is None:
        try:
            from tests.s3_server import weed_binary

            weed_binary()
        except Exception as error:  # noqa: BLE001 (ServiceUnavailable: how to get it)
            why = f"no S3 server: {error}"
    return why


@dataclass
class Repository:
    """One restic repository: on the S3 server (`bucket`/`prefix`) or at a local path."""

    address: str
    password: str
    environment: dict[str, str]  # what restic needs besides the address and password (S3 keys)
    cache: Path  # restic's cache (XDG_CACHE_HOME), the same for tma-backup and bare restic, removed at the end
    s3: Any = None  # tests.s3_server.S3Server
    prefix: str = ""
    path: Path | None = None

    def restic_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RESTIC_"))}
        env.update(self.environment, RESTIC_REPOSITORY=self.address, RESTIC_PASSWORD=self.password,
                   XDG_CACHE_HOME=str(self.cache))
        return env

    def settings(self) -> dict[str, str]:
        """The repository as tma-backup's settings name it (secrets in the environment, never in argv)."""
        settings = {"BACKUP_REPOSITORY": self.address, "BACKUP_REPOSITORY_PASSWORD": self.password,
                    "XDG_CACHE_HOME": str(self.cache)}
        if self.s3 is not None:
            settings.update(self.s3.env())
        return settings

    def restic(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        return run(["restic", *args], self.restic_env(), cwd=cwd, stdout=subprocess.PIPE, timeout=3600)

    def wipe(self) -> bool:
        """Remove every object of the repository (untimed), then `restic init` it again: a fresh one."""
        if self.s3 is not None:
            client = self.s3.client(timeout=30)
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=BUCKET, Prefix=self.prefix + "/"):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
        elif self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.restic("init")
        return True

    def stored_bytes(self) -> int:
        """Bytes the repository takes in its storage (after restic's own compression and encryption)."""
        if self.s3 is not None:
            client = self.s3.client(timeout=30)
            paginator = client.get_paginator("list_objects_v2")
            return sum(item["Size"] for page in paginator.paginate(Bucket=BUCKET, Prefix=self.prefix + "/")
                       for item in page.get("Contents", []))
        assert self.path is not None
        return sum(path.stat().st_size for path in self.path.rglob("*") if path.is_file())


def restic_summary(stdout: bytes) -> dict[str, Any]:
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith("{") and '"summary"' in line:
            summary: dict[str, Any] = json.loads(line)
            return summary
    raise StepFailed("restic backup printed no summary")


def fetch_seconds(shown: str) -> float | None:
    """The fetch's own time on the CLI's `Set : … (… SHA-256 checked; fetched; 3.2s)` line."""
    found = re.search(r"Set\s*:.*;\s*([\d.]+)s\)", shown)
    return float(found.group(1)) if found else None


class RepositorySection(BenchBase):
    s3_server: Any = None
    repository_info: dict[str, Any] | None = None

    def register_repository(self) -> None:
        night = f"a night of `{self.args.churn}` churn (bench/churn.py)"
        entries = [
            ("repo_offsite_s3_tma", "g. offsite link (tma_backup.offsite), a nightly run (the previous run's listing "
             "handed over), fresh S3 repository", "g. offsite link, S3"),
            ("repo_offsite_s3_first", "g. offsite link, a first night (it lists the repository), fresh S3 repository",
             "g. offsite link 1st night, S3"),
            ("repo_offsite_s3_bare", "g. bare: restic backup DUMP META, fresh S3 repository", "g. bare restic, S3"),
            ("repo_offsite_local_tma", "g. offsite link (tma_backup.offsite), a nightly run, fresh local-path "
             "repository", "g. offsite link, path"),
            ("repo_offsite_local_first", "g. offsite link, a first night, fresh local-path repository",
             "g. offsite link 1st night, path"),
            ("repo_offsite_local_bare", "g. bare: restic backup DUMP META, fresh local-path repository",
             "g. bare restic, path"),
            ("repo_night1_z6", "g. first night, BACKUP_COMPRESSION=6: the set's bytes added (S3)", "g. night 1, Z6"),
            ("repo_night2_z6", f"g. second night, BACKUP_COMPRESSION=6, after {night}", "g. night 2, Z6"),
            ("repo_night1_zstd", "g. first night, BACKUP_COMPRESSION=zstd-stream: the set's bytes added (S3)",
             "g. night 1, zstd-stream"),
            ("repo_night2_zstd", f"g. second night, BACKUP_COMPRESSION=zstd-stream, after {night}",
             "g. night 2, zstd-stream"),
            ("repo_night1_z0", "g. first night, BACKUP_COMPRESSION=0 (the floor: restic sees the rows as they are): "
             "the set's bytes added (S3)", "g. night 1, Z0"),
            ("repo_night2_z0", f"g. second night, BACKUP_COMPRESSION=0, after {night}", "g. night 2, Z0"),
            ("repo_restore_repository", "g. tma-backup restore --from-repository latest --confirm DB "
             "(empty BACKUP_DIR, S3)", "g. restore from S3"),
            ("repo_restore_local", "g. tma-backup restore FILE --confirm DB (the same backup, local file)",
             "g. restore local file"),
        ]
        for key, label, short in entries:
            self.measurements[key] = Measurement(key, label, short)

    @property
    def repository_keys(self) -> list[str]:
        return [key for key in self.measurements if key.startswith("repo_")]

    # ── set-up ───────────────────────────────────────────────────────────────────────────────────────
    def start_s3(self) -> Any:
        """A private SeaweedFS `weed mini` on loopback (tests/s3_server.py), stopped by cleanup()."""
        from tests.s3_server import start_s3

        server = start_s3(self.work / "s3")
        self.s3_server = server
        server.client(timeout=10).create_bucket(Bucket=BUCKET)
        return server

    def stop_s3(self) -> None:
        """Killed, not stopped: its data is thrown away with the work folder (a clean stop takes ~4 s)."""
        if self.s3_server is not None:
            try:
                self.s3_server.kill()
            except Exception as error:  # noqa: BLE001 (clean up the rest regardless)
                warn(f"stopping the S3 server: {error}")
            self.s3_server = None

    def repository(self, kind: str, name: str, password: str) -> Repository:
        if kind == "s3":
            server = self.s3_server
            prefix = f"{name}-{os.getpid()}"
            return Repository(server.url(BUCKET, prefix), password, server.aws_env(), self.work / "cache", s3=server,
                              prefix=prefix)
        path = self.work / "repositories" / name
        return Repository(str(path), password, {}, self.work / "cache", path=path)

    def set_na(self, why: str) -> None:
        for key in self.repository_keys:
            self.measurements[key].na = why

    # ── g. ───────────────────────────────────────────────────────────────────────────────────────────
    def repository_section(self, reference: str) -> None:
        self.register_repository()
        why = tools_unavailable()
        if why:
            self.set_na(why)
            return
        say("repository: starting a SeaweedFS S3 server on loopback")
        try:
            self.start_s3()
        except Exception as error:  # noqa: BLE001
            self.measurements["repo_offsite_s3_tma"].errors.append(f"the S3 server did not start: {error}"[:500])
            return
        self.repository_info = {"restic": _restic_version(), "s3": "SeaweedFS weed mini on 127.0.0.1",
                                "churn": self.args.churn}
        started = time.monotonic()
        try:
            self.repository_measurements(reference, secrets.token_urlsafe(24))
        finally:
            self.stop_s3()
            self.repository_info["seconds"] = round(time.monotonic() - started, 1)
            say(f"repository: done in {self.repository_info['seconds']:.0f} s")

    def repository_measurements(self, reference: str, password: str) -> None:
        """Three workers, started together: Z6 into an S3 repository (the offsite rounds, then the Z6
        nights and the restore), Z6 into a local-path repository, zstd-stream into an S3 repository.
        --quick leaves the local path out (it reads n/a): the smoke test stays within about a minute."""
        kinds = ("s3",) if self.args.quick else KINDS
        for kind in set(KINDS) - set(kinds):
            for side in ("tma", "first", "bare"):
                self.measurements[f"repo_offsite_{kind}_{side}"].na = "not measured with --quick"
        repos = {"s3": self.repository("s3", "offsite-s3", password),
                 **({"local": self.repository("local", "offsite-local", password)} if "local" in kinds else {}),
                 "zstd": self.repository("s3", "night-zstd", password),
                 "z0": self.repository("s3", "night-z0", password)}
        bare = {kind: self.repository(kind, f"bare-{kind}", password) for kind in kinds}
        compression = {"s3": "6", "local": "6", "zstd": "zstd-stream", "z0": "0"}
        owners = {"s3": "repo_offsite_s3_tma", "local": "repo_offsite_local_tma", "zstd": "repo_night1_zstd",
                  "z0": "repo_night1_z0"}
        workers = {key: self.worker(f"repo-{key}", {"BACKUP_COMPRESSION": compression[key], **repo.settings()})
                   for key, repo in repos.items()}
        for key, repo in repos.items():  # the warm-up backups go through the offsite link too
            if not self.attempt(self.measurements[owners[key]], repo.wipe):
                self.stop_worker(workers.pop(key))
        refused = self.start_workers(list(workers.values()), warm=not self.args.quick)  # --quick: no warm-up
        for key in list(workers):
            if key in refused:
                self.measurements[owners[key]].errors.append(refused[key])
                self.stop_worker(workers.pop(key))
        try:
            self.offsite_rounds(reference, {kind: workers[kind] for kind in kinds if kind in workers}, repos, bare)
            if "local" in workers:
                self.stop_worker(workers.pop("local"))
            nights = {key: (workers[worker], repos[worker])
                      for key, worker in (("z6", "s3"), ("zstd", "zstd"), ("z0", "z0")) if worker in workers}
            self.nights(reference, nights)
        finally:
            say("repository: stopping its workers")
            self.stop_workers(list(workers.values()))

    def offsite_rounds(self, reference: str, workers: dict[str, Worker], repos: dict[str, Repository],
                       bare: dict[str, Repository]) -> None:
        """Per round and per kind of repository, each into a fresh repository: the chain (Z6) of a first
        night (no listing handed over: the link lists the repository), then the chain of a nightly run (the
        listing the previous run's prune link leaves, here the true one of the fresh repository: no set),
        each with its offsite link timed; then a bare `restic backup` of the very same two files."""
        for number in range(self.args.runs):
            say(f"repository: offsite round {number + 1}/{self.args.runs}")
            for kind, worker in workers.items():
                first = self.measurements[f"repo_offsite_{kind}_first"]
                if self.attempt(first, repos[kind].wipe):
                    self.offsite_chain(first, worker, reference, "repository")
                tma = self.measurements[f"repo_offsite_{kind}_tma"]
                if not self.attempt(tma, repos[kind].wipe):
                    continue
                chained = self.offsite_chain(tma, worker, reference, "handed over",
                                             partial(self.hand_over_empty_listing, worker, reference))
                if chained is not None:
                    self.bare_restic(self.measurements[f"repo_offsite_{kind}_bare"], bare[kind],
                                     Path(chained.summary["backup"]))
                worker.clear_backups()

    def hand_over_empty_listing(self, worker: Worker, database: str) -> bool:
        """What the previous run's prune link leaves for the next offsite link (worker.repository.handover),
        true for a fresh repository: it holds no set of the database."""
        probe = ("import sys\nfrom worker.settings import get_settings\nfrom worker.repository.handover import hand_over\n"
                 "from worker.pg.executors import choose_executor\nfrom worker.pg.identity import server_identity\n"
                 "settings = get_settings()\n"
                 "hand_over(settings, sys.argv[1], server_identity(settings, choose_executor(settings), sys.argv[1]), set())")
        run([sys.executable, "-c", probe, database], clean_environment(worker.settings), cwd=self.work,
            stdout=subprocess.PIPE)
        return True

    def offsite_chain(self, item: Measurement, worker: Worker, database: str, listing: str,
                      before: Callable[[], bool] | None = None) -> ChainRun | None:
        """One chain with its offsite link timed from the result backend (meta's date_done → offsite's);
        `listing` is how the link must have learnt what the repository holds."""
        worker.clear_backups()
        if before is not None and not self.attempt(item, before):
            return None
        chained: ChainRun | None = self.attempt(item, lambda: run_chain(self.app, worker, database, self.timeout))
        if chained is None:
            return None
        offsite = chained.summary.get("offsite") or {}
        if "offsite" not in chained.steps:
            item.errors.append(f"the chain has no offsite link (steps {sorted(chained.steps)})")
            return None
        if offsite.get("listing") != listing:
            item.errors.append(f"the offsite link's listing was {offsite.get('listing')!r}, not {listing!r}")
            return None
        item.walls.append(chained.steps["offsite"])
        item.sizes.append(int(offsite.get("bytes_added", 0)))
        item.steps.append({"link (in-function)": float(offsite.get("seconds", 0.0)),
                           READ_BACK: float(offsite.get("confirm_seconds", 0.0)),
                           "chain wall": round(chained.wall, 3)})
        item.extra.append({"file_bytes": int(chained.summary["size_bytes"]), "set": offsite.get("set")})
        return chained

    def bare_restic(self, item: Measurement, repository: Repository, dump: Path) -> None:
        """`restic backup DUMP META` of the chain's own files, as the offsite link names them (relative,
        from BACKUP_DIR), into a repository made fresh just before (untimed)."""
        meta = dump.with_name(dump.name + ".meta")

        def once() -> tuple[float, dict[str, Any]]:
            repository.wipe()
            started = time.perf_counter()
            done = repository.restic("backup", "--json", dump.name, meta.name, cwd=dump.parent)
            return time.perf_counter() - started, restic_summary(done.stdout)

        measured = self.attempt(item, once)
        if measured is not None:
            wall, summary = measured
            item.walls.append(wall)
            item.sizes.append(int(summary.get("data_added", 0)))
            item.extra.append({"file_bytes": dump.stat().st_size})

    # ── the second night, and restore from the repository ─────────────────────────────────────────────
    def copy_database(self, source: str, target: str) -> None:
        with self.server.connect(autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target)))
            for attempt in range(20):  # the template must have no other session for a moment
                try:
                    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(target), sql.Identifier(source)))
                    return
                except Exception as error:  # noqa: BLE001
                    if "being accessed by other users" not in str(error) or attempt == 19:
                        raise
                    time.sleep(0.5)

    def night_backup(self, item: Measurement, worker: Worker, repository: Repository) -> ChainRun | None:
        before = repository.stored_bytes()
        chained: ChainRun | None = self.attempt(item, lambda: run_chain(self.app, worker, NIGHT_TARGET, self.timeout))
        if chained is None:
            return None
        offsite = chained.summary.get("offsite") or {}
        item.walls.append(chained.steps.get("offsite", 0.0))
        item.sizes.append(int(offsite.get("bytes_added", 0)))
        item.extra.append({"file_bytes": int(chained.summary["size_bytes"]),
                           "stored_bytes_added": repository.stored_bytes() - before})
        return chained

    def nights(self, reference: str, workers: dict[str, tuple[Worker, Repository]]) -> None:
        """A copy of the reference; night 1 (Z6, zstd-stream and Z0, each into its own fresh S3 repository);
        a night of churn; night 2. Then restore night 2's Z6 set from the repository into an empty
        BACKUP_DIR, against restoring the same backup from the local file, round by round."""
        say(f"repository: {NIGHT_TARGET}, a copy of {reference}")
        self.copy_database(reference, NIGHT_TARGET)
        for key, (worker, repository) in workers.items():
            worker.clear_backups()
            if self.attempt(self.measurements[f"repo_night1_{key}"], repository.wipe):
                say(f"repository: night 1, BACKUP_COMPRESSION={worker.settings['BACKUP_COMPRESSION']}")
                self.night_backup(self.measurements[f"repo_night1_{key}"], worker, repository)
        say(f"repository: a night of churn ({self.args.churn})")
        started = time.perf_counter()
        changed = churn.change_rows(self.server, NIGHT_TARGET, self.args.churn)
        changed["seconds"] = round(time.perf_counter() - started, 1)
        assert self.repository_info is not None
        self.repository_info["night"] = changed
        say(f"repository: {changed['rows_changed']} of {changed['rows_before']} rows changed "
            f"({changed['share']:.2%}) in {changed['seconds']} s")
        kept: ChainRun | None = None
        for key, (worker, repository) in workers.items():
            say(f"repository: night 2, BACKUP_COMPRESSION={worker.settings['BACKUP_COMPRESSION']}")
            chained = self.night_backup(self.measurements[f"repo_night2_{key}"], worker, repository)
            if key == "z6":
                kept = chained
        if kept is None:
            self.measurements["repo_restore_repository"].errors.append("no second-night Z6 backup to restore")
            return
        self.restore_rounds(Path(kept.summary["backup"]), workers["z6"][1])

    def cli_restore(self, arguments: list[str], backup_dir: Path,
                    repository: Repository | None) -> tuple[float, dict[str, float]]:
        """`tma-backup restore … --confirm NIGHT_TARGET` in-process (no broker), timed."""
        from bench.sections import restore_phases

        settings = {
            "DB_HOST": self.server.host, "DB_PORT": str(self.server.port), "DB_USER": self.server.user,
            "DB_NAME": NIGHT_TARGET, "DB_MODE": "host", "BACKUP_DIR": str(backup_dir), **self.code_env(),
            **(repository.settings() if repository is not None else {}),
        }
        if self.server.password:
            settings["DB_PASSWORD"] = self.server.password
        cli = Path(sys.executable).with_name("tma-backup")
        started = time.perf_counter()
        shown = run([str(cli), "restore", *arguments, "--confirm", NIGHT_TARGET], clean_environment(settings),
                    cwd=self.work, timeout=self.timeout).stderr.decode(errors="replace")  # the CLI reports on stderr
        wall = time.perf_counter() - started
        phases = restore_phases(shown)
        fetched = fetch_seconds(shown)
        if fetched is not None:
            phases = {"fetch": fetched, **phases}
        return wall, phases

    def restore_rounds(self, backup: Path, repository: Repository) -> None:
        """Night 2's Z6 backup restored over NIGHT_TARGET: fetched from the repository into an empty
        BACKUP_DIR, and from the local file. Kept pre-restore copies are dropped after each, untimed."""
        from_repo = self.measurements["repo_restore_repository"]
        local = self.measurements["repo_restore_local"]
        expected = self.exact_counts(NIGHT_TARGET)
        empty = self.work / "fetched"
        sides = [(from_repo, ["--from-repository", "latest"], empty, repository),
                 (local, [str(backup)], backup.parent, None)]
        for number in range(self.args.runs):
            say(f"repository: restore round {number + 1}/{self.args.runs}")
            for item, arguments, folder, repo in sides if number % 2 == 0 else sides[::-1]:  # each goes first in turn
                if item is from_repo:
                    shutil.rmtree(empty, ignore_errors=True)
                    empty.mkdir(mode=0o700, parents=True)
                measured = self.attempt(item, lambda a=arguments, f=folder, r=repo: self.cli_restore(a, f, r))
                self.drop_kept_copies(NIGHT_TARGET)
                if measured is None:
                    continue
                wall, phases = measured
                item.walls.append(wall)
                item.sizes.append(backup.stat().st_size)
                if phases:
                    item.steps.append(phases)
                if number == 0 and self.exact_counts(NIGHT_TARGET) != expected:
                    item.errors.append("the restored database's row counts differ from the original's")
        shutil.rmtree(empty, ignore_errors=True)

    # ── figures ──────────────────────────────────────────────────────────────────────────────────────
    def repository_paired(self) -> dict[str, Any]:
        pairs = {"offsite_vs_bare_restic": ("repo_offsite_s3_tma", "repo_offsite_s3_bare"),
                 "offsite_vs_bare_restic_local": ("repo_offsite_local_tma", "repo_offsite_local_bare"),
                 "offsite_vs_bare_restic_first_night": ("repo_offsite_s3_first", "repo_offsite_s3_bare"),
                 "offsite_vs_bare_restic_local_first_night": ("repo_offsite_local_first", "repo_offsite_local_bare"),
                 "restore_from_repository_vs_local": ("repo_restore_repository", "repo_restore_local")}
        found = {}
        for name, (top, bottom) in pairs.items():
            above, below = self.measurements.get(top), self.measurements.get(bottom)
            if above and below and above.walls and len(above.walls) == len(below.walls) and not above.errors \
                    and not below.errors:
                rounds = [round(x / y, 3) for x, y in zip(above.walls, below.walls, strict=True)]
                found[name] = {"rounds": rounds, "median": round(statistics.median(rounds), 3)}
        return found

    def repository_results(self) -> dict[str, Any]:
        from bench.report import ratio

        m = self.measurements
        if "repo_offsite_s3_tma" not in m:
            return {}

        def night(key: str) -> float | None:
            return ratio(m[f"repo_night2_{key}"].size, m[f"repo_night1_{key}"].size)

        def without_read_back(key: str) -> float | None:
            """The link's wall less its read-back, round by round: what it costs beside bare restic's upload."""
            item = m[key]
            if not item.walls or len(item.walls) != len(item.steps):
                return None
            return statistics.median(wall - steps.get(READ_BACK, 0.0)
                                     for wall, steps in zip(item.walls, item.steps, strict=True))

        def stored(key: str) -> float | None:
            first, second = m[f"repo_night1_{key}"].extra, m[f"repo_night2_{key}"].extra
            if not first or not second:
                return None
            return ratio(second[-1]["stored_bytes_added"], first[-1]["stored_bytes_added"])

        def excess(key: str, bare: str) -> float | None:
            """The link's median wall, read-back included, less bare restic's: seconds beyond the bare tool."""
            if m[key].wall is None or m[bare].wall is None:
                return None
            return round(m[key].wall - m[bare].wall, 3)

        return {
            "offsite_vs_bare_restic": ratio(m["repo_offsite_s3_tma"].wall, m["repo_offsite_s3_bare"].wall),
            "offsite_minus_bare_restic_seconds": excess("repo_offsite_s3_tma", "repo_offsite_s3_bare"),
            "second_night_bytes_ratio_z0": night("z0"),
            "second_night_bytes_ratio": night("z6"),
            "restore_from_repository_vs_local": ratio(m["repo_restore_repository"].wall, m["repo_restore_local"].wall),
            "offsite_vs_bare_restic_local": ratio(m["repo_offsite_local_tma"].wall, m["repo_offsite_local_bare"].wall),
            "offsite_vs_bare_restic_first_night": ratio(m["repo_offsite_s3_first"].wall, m["repo_offsite_s3_bare"].wall),
            "offsite_vs_bare_restic_local_first_night": ratio(m["repo_offsite_local_first"].wall,
                                                              m["repo_offsite_local_bare"].wall),
            "offsite_without_read_back_vs_bare_restic": ratio(without_read_back("repo_offsite_s3_tma"),
                                                              m["repo_offsite_s3_bare"].wall),
            "offsite_without_read_back_vs_bare_restic_local": ratio(without_read_back("repo_offsite_local_tma"),
                                                                    m["repo_offsite_local_bare"].wall),
            "second_night_bytes_ratio_zstd": night("zstd"),
            "second_night_stored_ratio": stored("z6"),
            "second_night_stored_ratio_zstd": stored("zstd"),
            "repository": dict(self.repository_info or {}),
        }


def _restic_version() -> str:
    try:
        return run(["restic", "version"], stdout=subprocess.PIPE).stdout.decode().strip()
    except (StepFailed, OSError):
        return "?"
