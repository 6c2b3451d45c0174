"""The soak's faults (bench/soak/__main__.py): caused for real, at random moments drawn from a seeded generator,
each logged with its times.

| kind | what is done |
| --- | --- |
| `worker_kill` | SIGKILL a worker and every process it started; started again after a while |
| `worker_stop` | SIGSTOP a worker's whole tree for longer than the lock's lease, then SIGCONT |
| `beat_kill` | SIGKILL beat; started again after a while (the minutes meanwhile are not sent) |
| `redis_restart` | Redis killed and started again, empty (queues, results, locks gone) |
| `pg_restart_fast`, `pg_restart_immediate` | PostgreSQL shut down (fast: SIGINT; immediate: SIGQUIT) and started |
| `s3_kill` | the S3 server killed (connections refused) for a while, then started on its data |
| `s3_stop` | the S3 server SIGSTOPped (accepts, never answers) for a while, then SIGCONT |
| `disk_full` | one worker's BACKUP_DIR (a tmpfs) filled to the last byte for a while |
| `restore` | `restore --from-repository latest --with-uploads` while backups run (TMA Cloud stopped, as the runbook says) |
| `rollback` | `rollback` of the last restore, the same way |
| `restore_killed` | the same restore, and the worker running it SIGKILLed at a random moment; then `repair` |
| `worker_kill_in_step` | SIGKILL of the worker that runs a chosen step (offsite, prune, maintenance, dump, drill), 0.1-2.5 s into it |

Faults overlap: each takes the resources it breaks (a worker, the database server, …) and another
fault of the same resource waits for its turn. After a restore, a rollback or a killed restore, the
live database and files are checked: one state the load recorded, its uploads all there, byte for byte.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.soak.load import Load, Record, read_state, sha256_file
from bench.soak.stack import DATABASE, HOSTS, Stack
from tests import services
from tests.faults import fill

# kind → (weight, duration range in seconds before the scale)
KINDS: dict[str, tuple[float, tuple[float, float]]] = {
    "worker_kill": (3.0, (5, 45)),
    "worker_stop": (2.0, (0, 35)),  # plus the lock's lease
    "beat_kill": (1.5, (5, 75)),
    "redis_restart": (2.0, (0.5, 6)),
    "pg_restart_fast": (1.5, (0.5, 6)),
    "pg_restart_immediate": (1.5, (0.5, 6)),
    "s3_kill": (1.5, (10, 120)),
    "s3_stop": (1.5, (10, 150)),
    "disk_full": (2.0, (20, 120)),
    "restore": (1.5, (0, 0)),
    "rollback": (1.0, (0, 0)),
    "restore_killed": (1.0, (0.2, 6)),  # seconds after the restore starts on a worker (a restore takes ~5 s)
    "worker_kill_in_step": (2.0, (0.1, 2.5)),  # seconds after the chosen step starts on a worker
}
# worker_kill_in_step: the steps it waits for, to kill the worker running one (restic busy in the repository)
STEPS = ("offsite", "prune", "repository_maintenance", "dump", "drill")
RESTORE_KINDS = ("restore", "rollback", "restore_killed")


@dataclass
class Fault:
    number: int
    kind: str
    target: str
    started: float
    ended: float | None = None
    detail: str = ""
    outcome: str = ""
    problems: list[str] = field(default_factory=list)  # what the live checks found wrong (defects)

    def describe(self, origin: float) -> dict[str, Any]:
        return {"number": self.number, "kind": self.kind, "target": self.target,
                "started_s": round(self.started - origin, 1), "started": self.started,
                "seconds": round((self.ended or self.started) - self.started, 1), "ended": self.ended,
                "detail": self.detail, "outcome": self.outcome, "problems": self.problems}


def live_problems(stack: Stack, record: Record) -> tuple[int | None, list[str]]:
    """With TMA Cloud stopped: the live database is one recorded state, and every upload it references
    is in UPLOAD_DIR with the bytes written under its key (a trashed one may be gone: the purge)."""
    problems = []
    try:
        with stack.connect(autocommit=True) as connection:
            tick, found = read_state(connection)
            rows = connection.execute("SELECT path, deleted_at IS NOT NULL FROM files WHERE type = 'file'"
                                      " AND path IS NOT NULL").fetchall()
    except psycopg.Error as error:
        return None, [f"the live database cannot be read: {str(error).strip().splitlines()[0]}"]
    if tick is None or tick not in record.states:
        problems.append(f"the live database holds no recorded state (newest tick {tick})")
    elif record.states[tick] != found:
        changed = sorted(name for name in found if found[name] != record.states[tick].get(name))
        problems.append(f"the live database is not the state of its tick {tick}: {changed} differ (a mix)")
    missing, wrong = [], []
    for path, trashed in rows:
        blob = stack.upload_dir / path
        if not blob.is_file():
            if not (trashed and path in record.purged):
                missing.append(path)
        elif record.blobs.get(path) != sha256_file(blob):
            wrong.append(path)
    if missing:
        problems.append(f"{len(missing)} referenced upload(s) missing from UPLOAD_DIR: {missing[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} upload(s) in UPLOAD_DIR with other bytes than written: {wrong[:5]}")
    return tick, problems


class Chaos:
    """Draws faults from `rng` at `rate` per hour and runs each in a thread of its own."""

    def __init__(self, stack: Stack, load: Load, record: Record, rng: random.Random, rate: float,
                 kinds: list[str], log_path: Path, scale: float = 1.0, lease: float = 9.0) -> None:
        self.stack, self.load, self.record, self.rng = stack, load, record, rng
        self.rate, self.kinds, self.log_path, self.scale, self.lease = rate, kinds, log_path, scale, lease
        self.faults: list[Fault] = []
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.restores_done = 0  # restores that kept a copy a rollback can bring back
        self.notes: list[str] = []

    # ── scheduling ───────────────────────────────────────────────────────────────────────────────────
    def run(self, until: float, first_after: float = 30.0, steady: bool = False) -> None:
        """Inject faults until `until` (time.time()); returns once no new fault is due. The gaps between
        faults are exponential (a Poisson process at `rate`), or with `steady` uniform between half and
        one and a half of the mean gap (the CI mode: a short soak must see several faults)."""
        mean = 3600.0 / self.rate

        def gap() -> float:
            return self.rng.uniform(0.5 * mean, 1.5 * mean) if steady else self.rng.expovariate(1 / mean)

        next_at = time.time() + (first_after if steady else min(first_after, gap() + 5))
        while not self.stopping.is_set():
            if next_at >= until:
                break
            self.stopping.wait(max(0.0, next_at - time.time()))
            if self.stopping.is_set():
                break
            self._start_one()
            next_at = time.time() + gap()

    def stop(self) -> None:
        """No new fault; every running one ends now and recovers (its thread joined)."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(1200)

    def _start_one(self) -> None:
        weights = [KINDS[kind][0] for kind in self.kinds]
        for _ in range(12):
            kind = self.rng.choices(self.kinds, weights)[0]
            if kind == "rollback" and self.restores_done == 0:
                continue
            targets = self._targets(kind)
            free = [(target, needs) for target, needs in targets if self._claim(needs)]
            if not free:
                continue
            target, needs = free[0]
            for _, other_needs in free[1:]:
                self._release(other_needs)
            low, high = KINDS[kind][1]
            seconds = self.rng.uniform(low, high) * (1.0 if kind in ("restore_killed", "worker_kill_in_step") else self.scale)
            if kind == "worker_stop":
                seconds += self.lease + 2
            fault = Fault(len(self.faults) + 1, kind, target, time.time())
            self.faults.append(fault)
            thread = threading.Thread(target=self._run_fault, args=(fault, needs, seconds),
                                      name=f"fault-{fault.number}", daemon=True)
            self.threads.append(thread)
            thread.start()
            return
        self.notes.append(f"{time.strftime('%H:%M:%S')}: no fault could start (everything busy)")

    def _targets(self, kind: str) -> list[tuple[str, set[str]]]:
        hosts = list(HOSTS)
        self.rng.shuffle(hosts)
        if kind in ("worker_kill", "worker_stop"):
            return [(host, {f"worker:{host}"}) for host in hosts]
        if kind == "disk_full":
            return [(host, {f"disk:{host}"}) for host in hosts]
        if kind == "restore_killed":
            return [("restore", {"tma", *(f"worker:{host}" for host in HOSTS)})]
        if kind == "worker_kill_in_step":
            return [(self.rng.choice(STEPS), {f"worker:{host}" for host in HOSTS})]
        if kind in RESTORE_KINDS:
            return [(kind, {"tma"})]
        resource = kind.split("_")[0]
        return [(resource, {resource})]

    def _claim(self, needs: set[str]) -> bool:
        with self.busy_lock:
            if needs & self.busy:
                return False
            self.busy |= needs
            return True

    def _release(self, needs: set[str]) -> None:
        with self.busy_lock:
            self.busy -= needs

    def _wait(self, seconds: float) -> None:
        """Hold a fault for `seconds`, or less when the soak is stopping."""
        self.stopping.wait(max(0.0, seconds))

    def _log(self, fault: Fault, what: str) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"t": round(time.time(), 3), "fault": fault.number, "kind": fault.kind,
                                     "target": fault.target, "what": what}) + "\n")

    def _run_fault(self, fault: Fault, needs: set[str], seconds: float) -> None:
        self._log(fault, f"start ({seconds:.1f} s)")
        try:
            action: Callable[[Fault, float], None] = getattr(self, f"_{fault.kind}")
            action(fault, seconds)
        except Exception as error:  # noqa: BLE001 (a fault that could not be caused is logged, not fatal)
            fault.outcome = fault.outcome or f"soak error: {type(error).__name__}: {error}"
        finally:
            fault.ended = time.time()
            self._log(fault, f"end: {fault.outcome}")
            self._release(needs)

    # ── the faults ───────────────────────────────────────────────────────────────────────────────────
    def _host(self, name: str) -> Any:
        return next(host for host in self.stack.hosts if host.name == name)

    def _start_worker(self, name: str) -> str:
        worker = self._host(name).worker
        worker.start()
        return "back" if worker.wait_for("ready.", 180) else "started, not ready within 180 s"

    def _worker_kill(self, fault: Fault, seconds: float) -> None:
        worker = self._host(fault.target).worker
        worker.kill()
        fault.detail = f"down {seconds:.0f} s"
        self._wait(seconds)
        fault.outcome = self._start_worker(fault.target)

    def _worker_kill_in_step(self, fault: Fault, seconds: float) -> None:
        """Wait (up to 4 minutes) for a worker to start the step `fault.target`, then SIGKILL it `seconds`
        later; started again 5 s after."""
        victim = self._wait_for_task(fault.target, 240)
        if victim is None:
            fault.outcome = f"no {fault.target} started within 4 minutes"
            return
        self._wait(seconds)
        self._host(victim).worker.kill()
        fault.detail = f"worker {victim} killed {seconds:.1f} s into {fault.target}"
        self._wait(5)
        fault.outcome = self._start_worker(victim)

    def _wait_for_task(self, step: str, timeout: float) -> str | None:
        """The host whose worker receives `tma_backup.<step>` first from now on, or None."""
        logs = {host.name: host.folder / "worker.log" for host in self.stack.hosts}
        offsets = {name: path.stat().st_size for name, path in logs.items()}
        deadline = time.time() + timeout
        while time.time() < deadline and not self.stopping.is_set():
            for name, path in logs.items():
                with open(path, "rb") as handle:
                    handle.seek(offsets[name])
                    text = handle.read().decode(errors="replace")
                if f"Task tma_backup.{step}[" in text and "] received" in text.split(f"Task tma_backup.{step}[", 1)[1][:60]:
                    return name
            time.sleep(0.1)
        return None

    def _worker_stop(self, fault: Fault, seconds: float) -> None:
        worker = self._host(fault.target).worker
        worker.pause()
        fault.detail = f"stopped {seconds:.0f} s (lease {self.lease:.0f} s)"
        self._wait(seconds)
        worker.resume()
        fault.outcome = "resumed"

    def _beat_kill(self, fault: Fault, seconds: float) -> None:
        beat = self.stack.beat
        assert beat is not None
        beat.kill()
        fault.detail = f"down {seconds:.0f} s"
        self._wait(seconds)
        beat.start()
        fault.outcome = "back" if beat.wait_for("beat: Starting", 60) else "started, silent for 60 s"

    def _redis_restart(self, fault: Fault, seconds: float) -> None:
        redis = self.stack.redis
        assert redis is not None
        redis.stop()
        fault.detail = f"down {seconds:.1f} s, restarted empty"
        self._wait(seconds)
        for attempt in range(5):
            try:
                redis.start()
                break
            except services.ServiceUnavailable:
                redis.stop()
                time.sleep(1 + attempt)
        fault.outcome = "back"

    def _pg_restart(self, fault: Fault, seconds: float, mode: str) -> None:
        pg = self.stack.pg
        assert pg is not None
        pg.stop(mode)
        fault.detail = f"{mode} shutdown, down {seconds:.1f} s"
        self._wait(seconds)
        pg.start()
        fault.outcome = "back"

    def _pg_restart_fast(self, fault: Fault, seconds: float) -> None:
        self._pg_restart(fault, seconds, "fast")

    def _pg_restart_immediate(self, fault: Fault, seconds: float) -> None:
        self._pg_restart(fault, seconds, "immediate")

    def _s3_kill(self, fault: Fault, seconds: float) -> None:
        s3 = self.stack.s3
        assert s3 is not None
        s3.kill()
        fault.detail = f"down {seconds:.0f} s"
        self._wait(seconds)
        s3.start()
        fault.outcome = "back"

    def _s3_stop(self, fault: Fault, seconds: float) -> None:
        s3 = self.stack.s3
        assert s3 is not None
        s3._signal(signal.SIGSTOP)
        fault.detail = f"stopped {seconds:.0f} s"
        self._wait(seconds)
        s3._signal(signal.SIGCONT)
        fault.outcome = "resumed"

    def _disk_full(self, fault: Fault, seconds: float) -> None:
        folder = self._host(fault.target).backup_dir
        filler = fill(folder)
        fault.detail = f"BACKUP_DIR full for {seconds:.0f} s"
        self._wait(seconds)
        filler.unlink(missing_ok=True)
        fault.outcome = "room again"

    # restores: TMA Cloud stopped (the load paused) for the restore and the check, as the runbook says
    def _restore_like(self, fault: Fault, argv: list[str], kill_after: float | None = None) -> None:
        if not self.load.pause(120):
            fault.outcome = "the load did not pause"
            return
        try:
            tick_before, _ = live_problems(self.stack, self.record)
            result = self._operator(fault, argv, kill_after)
            if kill_after is not None:
                repaired = self.stack.cli("repair", timeout=600)
                for _ in range(5):
                    if repaired.returncode == 0:
                        break
                    time.sleep(10)
                    repaired = self.stack.cli("repair", timeout=600)
                fault.detail += f"; repair exit {repaired.returncode}"
            tick_after, problems = live_problems(self.stack, self.record)
            fault.problems += problems
            fault.detail += f"; live tick {tick_before} → {tick_after}"
            if result.returncode == 0 and argv[0] == "restore":
                self.restores_done += 1
            elif result.returncode == 0 and argv[0] == "rollback":
                self.restores_done = max(0, self.restores_done)
        finally:
            self.load.resume()

    def _operator(self, fault: Fault, argv: list[str], kill_after: float | None) -> subprocess.CompletedProcess[str]:
        """The operator's command; a busy database (a backup holds it) is tried again, as an operator would."""
        result: subprocess.CompletedProcess[str] | None = None
        for attempt in range(4):
            if kill_after is None:
                result = self.stack.cli(*argv, timeout=900)
            else:
                result = self._killed(fault, argv, kill_after)
            errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
            fault.outcome = f"exit {result.returncode}" + (f": {errors[-1][8:][:240]}" if errors else "")
            if result.returncode == -999:
                fault.problems.append(f"`tma-backup {' '.join(argv)}` did not end within 15 minutes")
            if result.returncode == 0 or kill_after is not None or not any("busy" in line or "lock" in line
                                                                          for line in errors):
                break
            time.sleep(10 + 5 * attempt)
        assert result is not None
        return result

    def _killed(self, fault: Fault, argv: list[str], kill_after: float) -> subprocess.CompletedProcess[str]:
        """Start the command; once a worker runs its restore, wait `kill_after` seconds and SIGKILL that
        worker (restarted a few seconds later)."""
        logs = {host.name: host.folder / "worker.log" for host in self.stack.hosts}
        offsets = {name: path.stat().st_size for name, path in logs.items()}
        process = subprocess.Popen([services.TMA_BACKUP, *argv], env=self.stack.env(), cwd=self.stack.root,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   stdin=subprocess.DEVNULL)
        victim = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and process.poll() is None:
            for name, path in logs.items():
                with open(path, "rb") as handle:
                    handle.seek(offsets[name])
                    text = handle.read().decode(errors="replace")
                if "Task tma_backup.restore[" in text and "] received" in text:
                    victim = name
            time.sleep(0.2)
        if victim is not None:
            time.sleep(kill_after)
            self._host(victim).worker.kill()
            fault.detail = f"worker {victim} killed {kill_after:.1f} s into the restore"
            time.sleep(3)
            self._start_worker(victim)
        else:
            fault.detail = "the restore never started on a worker"
        try:
            out, err = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            return subprocess.CompletedProcess(argv, -999, out, err)
        return subprocess.CompletedProcess(argv, process.returncode, out, err)

    def _restore(self, fault: Fault, seconds: float) -> None:
        self._restore_like(fault, ["restore", "--from-repository", "latest", "--with-uploads", "--confirm", DATABASE])

    def _rollback(self, fault: Fault, seconds: float) -> None:
        self._restore_like(fault, ["rollback", "--confirm", DATABASE])

    def _restore_killed(self, fault: Fault, seconds: float) -> None:
        self._restore_like(fault, ["restore", "--from-repository", "latest", "--with-uploads", "--confirm", DATABASE],
                           kill_after=seconds)

    # ── the end ──────────────────────────────────────────────────────────────────────────────────────
    def heal(self) -> list[str]:
        """Everything up and running again (whatever a fault's thread left); returns what had to be done."""
        done = []
        stack = self.stack
        if stack.s3 is not None:
            stack.s3._signal(signal.SIGCONT)
            if stack.s3.process is None or stack.s3.process.poll() is not None:
                stack.s3.start()
                done.append("started S3")
        if stack.redis is not None and (stack.redis.process is None or stack.redis.process.poll() is not None):
            stack.redis.start()
            done.append("started Redis")
        if stack.pg is not None and (stack.pg.process is None or stack.pg.process.poll() is not None):
            stack.pg.start()
            done.append("started PostgreSQL")
        for host in stack.hosts:
            (host.backup_dir / "filler").unlink(missing_ok=True)
            if host.worker is not None:
                host.worker.resume()
                if not host.worker.alive():
                    done.append(f"started worker {host.name}: {self._start_worker(host.name)}")
        if stack.beat is not None and not stack.beat.alive():
            stack.beat.start()
            done.append("started beat")
        return done
