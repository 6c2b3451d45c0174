"""The benchmark's sections d (restore), e (docker mode) and f (eight databases, one worker process vs two)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from psycopg import sql

from bench import bare
from bench.base import FLEET_PREFIX, FLEET_SIZE, RESTORE_TARGET, BenchBase, say
from bench.generate import Server, default_name, ensure_database
from bench.proc import StepFailed, run
from bench.report import Measurement
from bench.workers import Worker, clean_environment, dispatch_backup, follow_chain


def restore_phases(shown: str) -> dict[str, float]:
    """The phases `tma-backup restore` reports on its Duration line: `Duration : 13.3s (checking 0.5s, …)`."""
    found = re.search(r"Duration\s*:\s*[\d.]+s \(([^)]*)\)", shown)
    if not found:
        return {}
    phases = (part.strip().rpartition(" ") for part in found.group(1).split(","))
    return {name: float(seconds.rstrip("s")) for name, _, seconds in phases if name}


class RestoreSection(BenchBase):
    def tma_backup_cli(self) -> Path:
        return Path(sys.executable).with_name("tma-backup")

    def tma_restore_available(self) -> bool:
        try:
            shown = run([str(self.tma_backup_cli()), "--help"], clean_environment(self.code_env()), cwd=self.work,
                        stdout=subprocess.PIPE).stdout.decode()
        except (StepFailed, OSError):
            return False
        commands = shown.split("Commands:", 1)[-1] if "Commands:" in shown else ""
        return any(line.split()[:1] == ["restore"] for line in commands.splitlines())

    def tma_restore(self, archive: Path, target: str) -> tuple[float, dict[str, float]] | None:
        """TMA-BACKUP'S RESTORE, timed. Returns None (reported as "n/a") while this build has no
        `tma-backup restore FILE --confirm DBNAME`; runs in-process (no broker) with the bench's settings,
        restoring `archive` (a tma-backup backup of `target`, with its .meta) over `target`."""
        if not self.restore_cli:
            return None
        settings = {
            "DB_HOST": self.server.host, "DB_PORT": str(self.server.port), "DB_USER": self.server.user,
            "DB_NAME": target, "DB_MODE": "host", "BACKUP_DIR": str(archive.parent), **self.code_env(),
        }
        if self.server.password:
            settings["DB_PASSWORD"] = self.server.password
        started = time.perf_counter()
        shown = run([str(self.tma_backup_cli()), "restore", str(archive), "--confirm", target], clean_environment(settings),
                    cwd=self.work, timeout=self.timeout).stderr.decode(errors="replace")  # the CLI reports on stderr
        return time.perf_counter() - started, restore_phases(shown)

    def restore_section(self, reference: str, source: Path | None, z6: Worker | None) -> None:
        seed = self.measurements["restore_seed"]
        tma = self.measurements["restore_tma"]
        self.restore_cli = self.tma_restore_available()
        if not self.restore_cli:
            tma.na = "`tma-backup restore` does not exist in this build (not in `tma-backup --help`)"
        if source is None or not source.exists():
            seed.errors.append("no backup from b. to restore")
            return
        expected = self.exact_counts(reference)
        archive = source
        if self.restore_cli and z6 is not None:
            # tma-backup restores its own backups of a database: make the target, back it up, restore that.
            say(f"restore: preparing {RESTORE_TARGET} and a tma-backup backup of it")
            prepared = self.attempt(seed, lambda: bare.seed_restore(self.server, source, RESTORE_TARGET))
            chained = prepared and self.chain_backup(tma, z6, RESTORE_TARGET, keep=True, timed=False)
            if not chained:
                tma.errors.append("could not prepare a tma-backup backup of the restore target")
                return
            archive = Path(chained.summary["backup"])
        for number in range(self.args.runs):
            say(f"restore round {number + 1}/{self.args.runs}")
            timed = self.attempt(seed, lambda: bare.seed_restore(self.server, archive, RESTORE_TARGET))
            if timed:
                seed.walls.append(timed.wall)
                seed.sizes.append(timed.size_bytes)
                seed.steps.append(timed.steps)
                if number == 0 and self.exact_counts(RESTORE_TARGET) != expected:
                    seed.errors.append("the restored database's row counts differ from the original's")
            if self.restore_cli:
                measured = self.attempt(tma, lambda: self.tma_restore(archive, RESTORE_TARGET))
                self.drop_kept_copies(RESTORE_TARGET)
                if measured is not None:
                    wall, phases = measured
                    tma.walls.append(wall)
                    if phases:
                        tma.steps.append(phases)
                    tma.sizes.append(archive.stat().st_size)
                    if number == 0 and self.exact_counts(RESTORE_TARGET) != expected:
                        tma.errors.append("the restored database's row counts differ from the original's")


class DockerSection(BenchBase):
    def docker_mode_works(self, server: Server, container: str) -> str | None:
        """None if tma-backup's docker mode accepts the container, else why not (one line)."""
        probe = ("from worker.settings import get_settings\nfrom worker.pg.executors import choose_executor\n"
                 "print(choose_executor(get_settings()).describe())")
        try:
            run([sys.executable, "-c", probe], clean_environment({**self.docker_settings(server, container),
                                                                  **self.code_env()}),
                cwd=self.work, stdout=subprocess.PIPE)
        except StepFailed as error:
            return str(error)
        return None

    def docker_settings(self, server: Server, container: str) -> dict[str, str]:
        settings = {"DB_MODE": "docker", "DB_CONTAINER": container, "DB_HOST": server.host,
                    "DB_PORT": str(server.port), "DB_USER": server.user, "BACKUP_COMPRESSION": "6"}
        if server.password:
            settings["DB_PASSWORD"] = server.password
        return settings

    def start_container(self, image: str) -> tuple[str, Server]:
        """A throw-away PostgreSQL container of `image` on a free port of 127.0.0.1 (removed at the end)."""
        name = f"tma-bench-pg-{os.getpid()}"
        password = secrets.token_hex(16)
        env = {**os.environ, "POSTGRES_PASSWORD": password}
        say(f"docker: starting {name} from {image}")
        run(["docker", "run", "-d", "--name", name, "--stop-signal", "SIGINT", "-e", "POSTGRES_PASSWORD",
             "-p", "127.0.0.1::5432", image], env, stdout=subprocess.PIPE)
        self.containers.append(name)
        published = run(["docker", "port", name, "5432/tcp"], env, stdout=subprocess.PIPE).stdout.decode()
        port = int(published.split()[0].rsplit(":", 1)[1])
        server = Server("127.0.0.1", port, "postgres", password)
        deadline = time.monotonic() + 60
        while True:  # a real query: the entrypoint's set-up server may answer pg_isready first
            try:
                with server.connect() as connection:
                    connection.execute("SELECT 1")
                return name, server
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def docker_section(self, size_mb: int) -> None:
        bare_item = self.measurements["docker_exec"]
        tma = self.measurements["docker_tma"]
        container = self.args.docker_container or os.environ.get("BENCH_DOCKER_CONTAINER")
        if container:
            server = Server("127.0.0.1", self.args.docker_port, self.server.user,
                            os.environ.get("BENCH_DOCKER_PASSWORD") or self.server.password)
        elif self.args.docker_image:
            container, server = self.attempt(bare_item, lambda: self.start_container(self.args.docker_image)) or (None, None)
            if container is None:
                tma.errors.append("no container")
                return
        else:
            bare_item.na = tma.na = ("no PostgreSQL container (--docker-image IMAGE, or --docker-container NAME "
                                     "--docker-port PORT)")
            return
        generated = ensure_database(server, default_name(size_mb), size_mb, say)
        why = self.docker_mode_works(server, container)
        worker = None
        if why:
            tma.na = f"tma-backup's docker mode is not available: {why}"
        else:
            worker = self.worker("docker", self.docker_settings(server, container))
            refused = self.start_workers([worker])
            if refused:
                tma.errors.append(refused["docker"])
                worker = None
        out = self.work / "docker" / "exec.dump"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            say("docker: warming the container's cache")
            run(["docker", "exec", container, "pg_dump", "-U", server.user, "-Fc", "--compress=0", "--no-sync",
                 "-f", "/dev/null", generated.name], server.tool_env())
            for number in range(self.args.runs):
                say(f"docker round {number + 1}/{self.args.runs}")
                timed = self.attempt(bare_item, lambda: bare.docker_exec_dump(
                    container, server.user, generated.name, out, server.tool_env()))
                out.unlink(missing_ok=True)
                if timed:
                    bare_item.walls.append(timed.wall)
                    bare_item.sizes.append(timed.size_bytes)
                    bare_item.steps.append(timed.steps)
                if worker is not None:
                    self.chain_backup(tma, worker, generated.name)
        finally:
            if worker is not None:
                self.stop_worker(worker)
            if generated.created and not self.args.keep_databases and container not in self.containers:
                with server.connect(autocommit=True) as admin:
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(generated.name)))


class FleetSection(BenchBase):
    def fleet_copies(self, source: str) -> list[str]:
        names = [f"{FLEET_PREFIX}{number}" for number in range(1, FLEET_SIZE + 1)]
        with self.server.connect(autocommit=True) as admin:
            for name in names:
                for attempt in range(20):  # the template must have no other session for a moment
                    try:
                        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                            sql.Identifier(name), sql.Identifier(source)))
                        break
                    except Exception as error:  # noqa: BLE001
                        if "being accessed by other users" not in str(error) or attempt == 19:
                            raise
                        time.sleep(0.5)
        return names

    def fleet_run(self, item: Measurement, workers: list[Worker], databases: list[str]) -> None:
        def once() -> tuple[float, dict[str, int]]:
            for worker in workers:
                worker.clear_backups()
            started = time.time()
            kickoffs = [dispatch_backup(self.app, name, "tma_backup")[1] for name in databases]
            chains, failed = [], []
            for kickoff in kickoffs:  # follow every chain to its end, even after one failed
                try:
                    chains.append(follow_chain(self.app, started, kickoff, self.timeout))
                except StepFailed as error:
                    failed.append(error)
            if failed:
                raise failed[0]
            hosts: dict[str, int] = {}
            for chained in chains:
                hosts[chained.host] = hosts.get(chained.host, 0) + 1
            return max(chained.wall for chained in chains), hosts

        measured = self.attempt(item, once)
        for worker in workers:
            worker.clear_backups()
        if measured:
            item.walls.append(measured[0])
            item.extra.append({"chains_per_host": measured[1]})

    def fleet_bare(self, item: Measurement, databases: list[str], streams: int) -> None:
        """The machine's own ceiling for f.: the seed's backup (a.) of the same databases with bare tools,
        in `streams` parallel streams."""
        folder = self.work / "fleet-bare"
        folder.mkdir(parents=True, exist_ok=True)

        def once() -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(lambda name: bare.seed_backup(self.server, name, folder / f"{name}.dump"), databases))
            return time.perf_counter() - started

        try:
            wall = self.attempt(item, once)
        finally:
            for path in folder.iterdir():
                path.unlink()
        if wall is not None:
            item.walls.append(wall)

    def fleet_section(self, reference: str, size_mb: int) -> None:
        one = self.measurements["fleet_1w"]
        two = self.measurements["fleet_2w"]
        fleet_mb = size_mb // FLEET_SIZE
        source = reference if fleet_mb < 16 else self.reference(default_name(fleet_mb), fleet_mb)[0]
        say(f"fleet: {FLEET_SIZE} copies of {source}")
        databases = self.fleet_copies(source)
        first = self.worker("fleet1", {"BACKUP_COMPRESSION": "6"})
        second = self.worker("fleet2", {"BACKUP_COMPRESSION": "6"})
        refused = self.start_workers([first])
        if refused:
            one.errors.append(refused["fleet1"])
            two.errors.append("no first worker")
            return
        for number in range(self.args.runs):
            say(f"fleet round {number + 1}/{self.args.runs}")
            self.fleet_bare(self.measurements["fleet_bare_1"], databases, 1)
            self.fleet_run(one, [first], databases)
            refused = self.start_workers([second])
            if refused:
                two.errors.append(refused["fleet2"])
                continue
            self.fleet_run(two, [first, second], databases)
            second.stop()
            self.fleet_bare(self.measurements["fleet_bare_2"], databases, 2)
        self.stop_worker(first)
        self.stop_worker(second)

