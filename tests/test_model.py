"""The whole set as a model (issue 20): a stateful property test (hypothesis's `RuleBasedStateMachine`)
drives the real CLI (in-process mode) against real services in random orders, and after every step
checks what must hold against a plain model of it.

Steps: backup; restore of a set (from the repository: with its uploads, the database alone, the
uploads alone; from a local backup file with its uploads); rollback; repair; drill (local and from the
repository); repository prune; a restore or a backup SIGKILLed at a random `TMA_BACKUP_CRASH_AT` point,
then repair; and TMA Cloud's own edits: an upload added (blob and row), one removed, a row changed.

The model: the live state (every table's content digest, every upload's SHA-256) is one the operator
asked for: the live edits, the set last restored, or the copy a rollback brought back; each restore
keeps the state it replaced (its files with it when they were swapped) for the next rollback. After a
crash and a repair the state is the old one or the new one, as the crash point says, never a mix.
After every repair: nothing of the tool's is left (no journal, staging or unpaired files beyond
RESTORE_KEEP_PREVIOUS, no files set aside for a database copy that is gone, no scratch or drill
database, no database refusing connections). At the end of every example, every set the repository
holds that a backup reported good is restored with plain restic and pg_restore and compared with the
state recorded when it was taken, byte for byte.

Runs here: a bounded, derandomized number of examples (`TMA_MODEL_EXAMPLES`, default 3, of at most
`TMA_MODEL_STEPS` steps, default 8), the same every run. For a release, a long random run:

    TMA_MODEL_EXAMPLES=200 TMA_MODEL_STEPS=30 TMA_MODEL_RANDOM=1 .venv/bin/python -m pytest tests/test_model.py

Its shrunk counterexamples become plain regression tests (tests/test_sequences.py).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from tests import services, tma_cloud
from tests.conftest import base_env, run_cli
from tests.helpers import error_lines, settings_for, wait_for, wait_until_free
from tests.test_repository import Repository, local_repository, restic, restic_init, snapshots, tag_value
from tests.test_uploads import write_env_file
from worker.archive import catalogue
from worker.errors import LockHeld
from worker.repository.lock import repository_lock
from worker.uploads import swap as uploads_swap

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TMA_MODEL_EXAMPLES", "3"))
STEPS = int(os.environ.get("TMA_MODEL_STEPS", "8"))
RANDOM = os.environ.get("TMA_MODEL_RANDOM", "") == "1"
KEEP_PREVIOUS = 1

# Where a restore with uploads can be killed, and what a repair must then settle it to.
RESTORE_CRASHES = {
    "fetch:publish": "old",
    "restore:restored": "old",
    "swap:connections-refused": "old",
    "swap:between-renames": "old",
    "uploads:after-database-swap": "new",
    "uploads:half-moved-out": "new",
}


@dataclass(frozen=True)
class State:
    """What TMA Cloud would see: every table's content digest and every upload's SHA-256."""

    tables: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return f"{len(self.files)} files, tables {dict(self.tables)}"


@dataclass
class Kept:
    """A copy a restore or rollback kept: its database state, and its files when they were set aside with it."""

    tables: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...] | None


@dataclass
class Context:
    pg: services.PostgresServer
    restic_bin: str
    root: Path
    examples: list[str] = field(default_factory=list)


class SetModel(RuleBasedStateMachine):
    context: Context

    def __init__(self) -> None:
        super().__init__()
        context = self.context
        self.name = f"tma_model_{uuid.uuid4().hex[:8]}"
        self.root = context.root / self.name
        self.root.mkdir(parents=True)
        context.examples.append(self.name)
        self.pg = context.pg
        self.restic_bin = context.restic_bin
        tma_cloud.create_populated(self.pg, self.name)
        self.folder = self.root / "uploads"
        with self.pg.connect(self.name, autocommit=True) as connection:
            tma_cloud.make_uploads(connection, self.folder, 8, sizes=(100, 2000), trashed=1)
        self.repository: Repository = restic_init(self.restic_bin, local_repository(self.root / "repository",
                                                                                    self.root / "restic-cache"))
        env_file = write_env_file(self.root / "tma-cloud.env", self.folder)
        self.backup_dir = self.root / "backups"
        self.env = base_env(self.pg, self.backup_dir, DB_NAME=self.name, TMA_ENV_FILE=str(env_file),
                            RESTORE_KEEP_PREVIOUS=str(KEEP_PREVIOUS), BACKUP_LOCK_TIMEOUT="5",
                            **self.repository.settings)
        self.rng = random.Random(0)
        self.live = self.observe()
        self.sets: dict[str, State] = {}  # backup timestamp → the state it holds (reported good, or sent later)
        self.reported: list[str] = []  # timestamps of backups whose command succeeded, oldest first
        self.kept: list[Kept] = []  # the copies a rollback would bring back, the newest last
        self.steps: list[str] = []

    # ---------------------------------------------------------------------------------------------
    # Observing and running

    def observe(self) -> State:
        with self.pg.connect(self.name) as connection:
            tables = tuple(sorted(tma_cloud.table_digests(connection).items()))
        return State(tables, tuple(sorted(tma_cloud.folder_digests(self.folder).items())))

    def cli(self, *args: str, crash: str | None = None) -> Any:
        env = {**self.env, **({"TMA_BACKUP_CRASH_AT": crash} if crash else {})}
        result = run_cli(list(args), env, self.root, timeout=240)
        self.steps.append(f"{' '.join(args)}{f' [crash at {crash}]' if crash else ''} → {result.returncode}")
        assert "Traceback" not in result.output, result.output
        return result

    def ok(self, *args: str) -> Any:
        result = self.cli(*args)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.output}\nsteps: {self.steps}"
        assert error_lines(result.stderr) == [], result.output
        return result

    def refused(self, *args: str) -> Any:
        result = self.cli(*args)
        assert result.returncode == 1, f"{' '.join(args)} should have failed:\n{result.output}"
        assert len(error_lines(result.stderr)) == 1, result.output
        return result

    def newest_backup(self) -> Path:
        return sorted(self.backup_dir.glob(f"{self.name}_*.dump"))[-1]

    def present(self) -> dict[str, str]:
        """The database parts in the repository: backup timestamp → snapshot id."""
        return {str(tag_value(item, "at:")): item["id"] for item in snapshots(self.restic_bin, self.repository)
                if tag_value(item, "part:") == "database" and tag_value(item, "db:") == self.name}

    def complete_backups(self) -> list[Path]:
        return [entry.path for entry in catalogue.list_backups(self.backup_dir, self.name) if entry.complete]

    def wait_for_locks(self) -> None:
        """A killed run's locks (the database's, the repository's) are free once their lease ran out."""
        current = settings_for(self.env)
        wait_until_free(current, self.name, timeout=60)

        def repository_free() -> bool:
            lock = repository_lock(current, f"probe-{uuid.uuid4()}")
            try:
                lock.acquire()
            except LockHeld:
                return False
            lock.release()
            return True

        wait_for(repository_free, timeout=60, interval=0.25, what="the repository's lock to be free")

    def keep(self, before: State, with_files: bool) -> None:
        self.kept.append(Kept(before.tables, before.files if with_files else None))
        self.kept = self.kept[-KEEP_PREVIOUS:] if KEEP_PREVIOUS else []

    # ---------------------------------------------------------------------------------------------
    # TMA Cloud's own edits

    @rule()
    def tma_adds_an_upload(self) -> None:
        name = tma_cloud.upload_name(self.rng)
        plain = self.rng.randint(100, 3000)
        tma_cloud.write_blob(self.folder / name, plain)
        with self.pg.connect(self.name, autocommit=True) as connection:
            connection.execute("INSERT INTO files (owner_id, path, mime, size) SELECT min(id), %s, 'application/pdf', %s"
                               " FROM users", (name, plain))
        self.steps.append(f"TMA adds {name}")
        self.live = self.observe()

    @rule(pick=st.integers(0, 1000))
    def tma_deletes_an_upload(self, pick: int) -> None:
        with self.pg.connect(self.name, autocommit=True) as connection:
            rows = [row[0] for row in connection.execute(
                "SELECT path FROM files WHERE path IS NOT NULL ORDER BY path").fetchall()]
            present = [path for path in rows if (self.folder / path).is_file()]
            if not present:
                return
            path = present[pick % len(present)]
            connection.execute("DELETE FROM share_links WHERE file_id IN (SELECT id FROM files WHERE path = %s)", (path,))
            connection.execute("DELETE FROM files WHERE path = %s", (path,))
        (self.folder / path).unlink()
        self.steps.append(f"TMA deletes {path}")
        self.live = self.observe()

    @rule(value=st.integers(0, 10**6))
    def tma_changes_a_row(self, value: int) -> None:
        with self.pg.connect(self.name, autocommit=True) as connection:
            connection.execute("UPDATE users SET name = %s WHERE id = (SELECT min(id) FROM users)", (f"renamed {value}",))
        self.steps.append(f"TMA renames a user ({value})")
        self.live = self.observe()

    # ---------------------------------------------------------------------------------------------
    # The operator's commands

    @rule()
    def backup(self) -> None:
        self.ok("backup")
        timestamp = catalogue.timestamp_of(self.newest_backup(), self.name)
        self.sets[timestamp] = self.live
        self.reported.append(timestamp)
        assert timestamp in self.present(), "the set a backup reported good is in the repository"
        assert self.observe() == self.live, "a backup changes nothing live"

    @precondition(lambda self: bool(self.reported))
    @rule(pick=st.integers(0, 1000), what=st.sampled_from(["with-uploads", "database", "uploads-only", "latest"]))
    def restore_a_set(self, pick: int, what: str) -> None:
        present = self.present()
        candidates = [timestamp for timestamp in self.reported if timestamp in present]
        assert self.reported[-1] in present, "retention never forgets the newest set"
        timestamp = self.reported[-1] if what == "latest" else candidates[pick % len(candidates)]
        reference = "latest" if what == "latest" else present[timestamp][:8]
        flags = {"with-uploads": ["--with-uploads"], "latest": ["--with-uploads"], "database": [],
                 "uploads-only": ["--uploads-only"]}[what]
        before, target = self.live, self.sets[timestamp]
        self.ok("restore", "--from-repository", reference, *flags, "--confirm", self.name)
        if what == "uploads-only":
            self.live = State(before.tables, target.files)
        elif what == "database":
            self.live = State(target.tables, before.files)
            self.keep(before, with_files=False)
        else:
            self.live = target
            self.keep(before, with_files=True)
        assert self.observe() == self.live

    @precondition(lambda self: bool(self.reported))
    @rule(pick=st.integers(0, 1000))
    def restore_a_local_backup_with_its_uploads(self, pick: int) -> None:
        backups = [path for path in self.complete_backups()
                   if catalogue.timestamp_of(path, self.name) in self.sets]
        if not backups:
            return
        dump = backups[pick % len(backups)]
        timestamp = catalogue.timestamp_of(dump, self.name)
        before = self.live
        if timestamp not in self.present():  # its set was forgotten: its uploads part with it
            self.refused("restore", str(dump), "--with-uploads", "--confirm", self.name)
        else:
            self.ok("restore", str(dump), "--with-uploads", "--confirm", self.name)
            self.live = self.sets[timestamp]
            self.keep(before, with_files=True)
        assert self.observe() == self.live

    @rule()
    def rollback(self) -> None:
        if not self.kept:
            self.refused("rollback", "--confirm", self.name)
            return
        before = self.live
        self.ok("rollback", "--confirm", self.name)
        back = self.kept.pop()
        self.live = State(back.tables, back.files if back.files is not None else before.files)
        self.kept.append(Kept(before.tables, before.files if back.files is not None else None))
        assert self.observe() == self.live

    @rule()
    def repair(self) -> None:
        self.ok("repair")
        assert self.observe() == self.live
        self.nothing_left_over()

    @precondition(lambda self: bool(self.reported))
    @rule(from_repository=st.booleans())
    def drill(self, from_repository: bool) -> None:
        self.ok("drill", *(["--from-repository", "latest"] if from_repository else []))
        assert self.observe() == self.live

    @precondition(lambda self: bool(self.reported))
    @rule()
    def repository_prune(self) -> None:
        self.ok("repository", "prune")

    @precondition(lambda self: bool(self.reported))
    @rule(point=st.sampled_from(sorted(RESTORE_CRASHES)))
    def a_restore_killed(self, point: str) -> None:
        before, target = self.live, self.sets[self.reported[-1]]
        crashed = self.cli("restore", "--from-repository", "latest", "--with-uploads", "--confirm", self.name,
                           crash=point)
        assert crashed.returncode == -9, crashed.output
        self.wait_for_locks()
        self.ok("repair")
        if RESTORE_CRASHES[point] == "new":
            self.live = target
            self.kept.append(Kept(before.tables, before.files))  # no trim ran: both copies stay
        assert self.observe() == self.live, f"killed at {point}: expected the {RESTORE_CRASHES[point]} state"
        self.nothing_left_over()

    @rule()
    def a_backup_killed_before_it_sends(self) -> None:
        crashed = self.cli("backup", crash="offsite")
        assert crashed.returncode == -9, crashed.output
        timestamp = catalogue.timestamp_of(self.newest_backup(), self.name)
        self.sets[timestamp] = self.live  # complete here, sent by the next backup (not reported good)
        self.wait_for_locks()
        assert self.observe() == self.live

    # ---------------------------------------------------------------------------------------------
    # What must hold

    def nothing_left_over(self) -> None:
        ours = sorted(name for name in os.listdir(self.folder) if not uploads_swap.is_tmas(name))
        with self.pg.connect(autocommit=True) as admin:
            rows = admin.execute(
                "SELECT d.datname, d.datallowconn, s.description FROM pg_database d LEFT JOIN pg_shdescription s"
                " ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass WHERE d.datname LIKE %s"
                " OR s.description LIKE %s", (f"{self.name}%", f"tma-backup:%:{self.name}:%")).fetchall()
        kept = sorted(name for name, _, description in rows if description and description.startswith("tma-backup:previous:"))
        strays = [name for name, _, description in rows
                  if description and description.startswith(("tma-backup:scratch:", "tma-backup:drill:"))]
        refusing = [name for name, allowed, description in rows
                    if not allowed and not (description or "").startswith("tma-backup:previous:")]
        assert strays == [] and refusing == [], (strays, refusing, self.steps)
        assert uploads_swap.JOURNAL not in ours, self.steps
        assert not [name for name in ours if name.startswith(uploads_swap.STAGED_PREFIX)], (ours, self.steps)
        paired = [name for name in ours if name.startswith(uploads_swap.PREVIOUS_PREFIX)
                  and not name.startswith(uploads_swap.UNPAIRED_PREFIX)]
        assert [name.removeprefix(uploads_swap.PREVIOUS_PREFIX) for name in paired if
                name.removeprefix(uploads_swap.PREVIOUS_PREFIX) not in kept] == [], (ours, kept, self.steps)
        assert len([name for name in ours if name.startswith(uploads_swap.UNPAIRED_PREFIX)]) <= KEEP_PREVIOUS
        here = os.listdir(self.backup_dir) if self.backup_dir.exists() else []  # (no command made it yet)
        assert not [name for name in here if ".partial" in name or name.startswith(".fetch-")], here

    def every_good_set_restores_byte_for_byte(self) -> None:
        present = self.present()
        parts = {(tag_value(item, "at:"), tag_value(item, "part:")): item["id"]
                 for item in snapshots(self.restic_bin, self.repository) if tag_value(item, "db:") == self.name}
        for timestamp, state in self.sets.items():
            if timestamp not in present:
                continue
            target = self.root / f"check-{timestamp}"
            restic(self.restic_bin, self.repository, "restore", parts[(timestamp, "uploads")], "--target",
                   str(target / "uploads"))
            files = tuple(sorted(tma_cloud.folder_digests(target / "uploads", skip_ours=False).items()))
            assert files == state.files, f"set {timestamp}: its uploads are not what was live at its backup"
            restic(self.restic_bin, self.repository, "restore", present[timestamp], "--target", str(target / "db"))
            dump = target / "db" / catalogue.backup_name(self.name, timestamp)
            scratch = f"check_{uuid.uuid4().hex[:10]}"
            with self.pg.connect(autocommit=True) as admin:
                tma_cloud.create_database(admin, scratch)
            try:
                subprocess.run([shutil.which("pg_restore") or "pg_restore", "-h", self.pg.host, "-p", str(self.pg.port),
                                "-U", "postgres", "-d", scratch, "--no-owner", str(dump)], check=True,
                               capture_output=True)
                with self.pg.connect(scratch) as connection:
                    tables = tuple(sorted(tma_cloud.table_digests(connection).items()))
                assert tables == state.tables, f"set {timestamp}: its database is not what was live at its backup"
            finally:
                with self.pg.connect(autocommit=True) as admin:
                    tma_cloud.drop_database(admin, scratch)
            shutil.rmtree(target)

    def teardown(self) -> None:
        try:
            if self.reported:
                self.every_good_set_restores_byte_for_byte()
        finally:
            with self.pg.connect(autocommit=True) as admin:
                for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                             (f"{self.name}%",)).fetchall():
                    tma_cloud.drop_database(admin, name)
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.timeout(max(600, 45 * EXAMPLES * STEPS))  # real commands: up to some 15 s a step on a busy machine
def test_the_whole_set_under_random_sequences_of_real_commands(pg, restic_bin, tmp_path):
    SetModel.context = Context(pg, restic_bin, tmp_path)
    run_state_machine_as_test(SetModel, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not RANDOM, database=None,
        suppress_health_check=list(HealthCheck), print_blob=True))
    assert SetModel.context.examples, "the model ran"
