"""The soak's end (bench/soak/__main__.py), with the faults stopped: does repair converge, and does every set the
product reported good restore, byte for byte, to what was live when its snapshot was taken?

Convergence: `tma-backup repair` until it exits 0, then nothing refuses connections (but the kept
previous copies, which do so by design), no scratch or drill database, nothing of the tool's in
UPLOAD_DIR but the files kept with a kept database copy (and at most RESTORE_KEEP_PREVIOUS unpaired
ones), no lock held in Redis or in the repository, no interrupted run's files in a BACKUP_DIR.

A set, with plain restic and pg_restore (not the tool): its database part restored into a scratch
folder, the dump's SHA-256 against its `.meta`, the `.env` against the file it was taken from, the
dump restored into a scratch database whose newest tick must carry exactly that tick's recorded
digests, a tick live while the set's snapshot was taken; its uploads part restored into a scratch
folder, every file the bytes written under its key, every upload the restored database references
there (but one TMA Cloud purged while the set was taken: 15 days in the trash, or named missing by its `.meta`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

from bench.soak.load import Record, read_state, sha256_file
from bench.soak.stack import DATABASE, Stack
from tests import tma_cloud

TOOL_DATABASE_COMMENTS = ("tma-backup:scratch:", "tma-backup:drill:")
PURGE_AFTER = 15 * 86400  # TMA Cloud purges an upload 15 days after it went to the trash


def restic(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which("restic") or "restic", *args], env=stack.restic_env(), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def snapshots(stack: Stack) -> list[dict[str, Any]]:
    result = restic(stack, "snapshots", "--json", "--no-lock")
    if result.returncode != 0:
        raise RuntimeError(f"restic snapshots failed: {result.stderr.strip()[-300:]}")
    return list(json.loads(result.stdout or "[]"))


def tag(snapshot: dict[str, Any], prefix: str) -> str | None:
    return next((item[len(prefix):] for item in snapshot.get("tags") or [] if item.startswith(prefix)), None)


def parts(stack: Stack) -> dict[str, dict[str, str]]:
    """Our sets in the repository: backup timestamp → {"database": snapshot id, "uploads": snapshot id}."""
    found: dict[str, dict[str, str]] = {}
    for item in snapshots(stack):
        if "tma-backup" not in (item.get("tags") or []) or tag(item, "db:") != DATABASE:
            continue
        at, part = tag(item, "at:"), tag(item, "part:")
        if at and part:
            found.setdefault(at, {})[part] = item["id"]
    return found


def epoch(timestamp: str) -> float:
    return datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()


# ── convergence ──────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Convergence:
    repair_runs: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    problems: list[str] = field(default_factory=list)
    kept_copies: list[str] = field(default_factory=list)
    live_holders: list[dict[str, str]] = field(default_factory=list)  # locks held by work after repair

    def describe(self) -> dict[str, Any]:
        return {"converged": self.converged, "problems": self.problems, "repair_runs": self.repair_runs,
                "kept_copies": self.kept_copies, "locks_taken_after_repair": self.live_holders}


def locks_held(stack: Stack) -> list[str]:
    assert stack.redis is not None
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=5)
    try:
        return sorted(key.decode() for key in client.scan_iter("tma_backup:lock:*"))
    finally:
        client.close()


# A lock in Redis lives BACKUP_LOCK_TIMEOUT (9 s) past its holder's last renewal. Work can still take one
# after the soak saw none: a restarted worker's start-up repair waits out a dead run's lease and tries again
# (in a thread, no task anyone can see). Held this long after repair, a lock is no such run but a leak.
LOCK_SETTLE = 60.0


def locks_left(stack: Stack, result: Convergence, timeout: float = LOCK_SETTLE) -> dict[str, str]:
    """The locks (key: holder) still held after `timeout`; live holders met on the way go in `result`."""
    assert stack.redis is not None
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            held = {key.decode(): (client.get(key) or b"").decode() for key in client.scan_iter("tma_backup:lock:*")}
            held = {key: owner for key, owner in held.items() if owner}  # released between the scan and the get
            for key, owner in held.items():
                if {"lock": key, "holder": owner} not in result.live_holders:
                    result.live_holders.append({"lock": key, "holder": owner})
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(1)
    finally:
        client.close()


def wait_for_idle(stack: Stack, timeout: float) -> list[str]:
    """Wait until no database or repository lock is held (running chains, drills, maintenance ended)."""
    deadline = time.monotonic() + timeout
    held = locks_held(stack)
    while held and time.monotonic() < deadline:
        time.sleep(2)
        held = locks_held(stack)
    return held


def converge(stack: Stack, keep_previous: int, attempts: int = 5) -> Convergence:
    result = Convergence()
    for attempt in range(attempts):
        run = stack.cli("repair", timeout=600)
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("[")]
        result.repair_runs.append({"exit": run.returncode, "lines": lines[-12:]})
        if run.returncode == 0:
            break
        time.sleep(10 + 10 * attempt)
    else:
        result.problems.append(f"repair did not exit 0 in {attempts} runs: {result.repair_runs[-1]['lines'][-3:]}")
    assert stack.pg is not None
    with stack.pg.connect(autocommit=True) as admin:
        rows = admin.execute(
            "SELECT d.datname, d.datallowconn, coalesce(s.description, '') FROM pg_database d LEFT JOIN pg_shdescription s"
            " ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass WHERE NOT d.datistemplate").fetchall()
    kept = sorted(name for name, _, comment in rows if comment.startswith("tma-backup:previous:"))
    result.kept_copies = kept
    strays = sorted(name for name, _, comment in rows if comment.startswith(TOOL_DATABASE_COMMENTS))
    refusing = sorted(name for name, allowed, comment in rows
                      if not allowed and not comment.startswith("tma-backup:previous:"))
    if strays:
        result.problems.append(f"scratch or drill databases left: {strays}")
    if refusing:
        result.problems.append(f"databases refusing connections: {refusing}")
    if DATABASE not in {name for name, _, _ in rows}:
        result.problems.append(f"the live database {DATABASE} is gone")
    ours = sorted(name for name in os.listdir(stack.upload_dir) if name.startswith(".tma-"))
    journal = [name for name in ours if name == ".tma-uploads-swap.json"]
    staging = [name for name in ours if name.startswith(".tma-restore-")]
    unpaired = [name for name in ours if name.startswith(".tma-previous-uploads-")]
    paired = [name for name in ours if name.startswith(".tma-previous-") and name not in unpaired]
    orphaned = [name for name in paired if name.removeprefix(".tma-previous-") not in kept]
    other = [name for name in ours if name not in {*journal, *staging, *unpaired, *paired}]
    for what, names in (("an uploads swap journal", journal), ("restore staging folders", staging),
                        ("files set aside for a database copy that is gone", orphaned),
                        ("other tool files", other)):
        if names:
            result.problems.append(f"UPLOAD_DIR holds {what}: {names}")
    if len(unpaired) > keep_previous:
        result.problems.append(f"UPLOAD_DIR holds {len(unpaired)} unpaired folders of files set aside "
                               f"(RESTORE_KEEP_PREVIOUS={keep_previous}): {unpaired}")
    leaked = locks_left(stack, result)
    if leaked:
        result.problems.append(f"locks held in Redis {LOCK_SETTLE:.0f} s after repair: {leaked}")
    listed = restic(stack, "list", "locks", "--no-lock")
    if listed.returncode != 0:
        result.problems.append(f"restic list locks failed: {listed.stderr.strip()[-200:]}")
    elif listed.stdout.split():
        result.problems.append(f"restic locks left in the repository: {len(listed.stdout.split())}")
    for host in stack.hosts:
        leftovers = sorted(name for name in os.listdir(host.backup_dir)
                           if ".partial" in name or name.startswith(".fetch-") or name.endswith(".tmp"))
        if leftovers:
            result.problems.append(f"{host.name}'s BACKUP_DIR holds interrupted runs' files: {leftovers}")
    result.converged = not result.problems
    return result


# ── every set ────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class SetCheck:
    timestamp: str
    sources: list[str]  # who reported it good: run, listing, status, sent-by
    restorable: bool = False
    tick: int | None = None
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    database_only: bool = False  # listed by the product without uploads: its database part is what it reports

    def describe(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "sources": self.sources, "restorable": self.restorable,
                "database_only": self.database_only,
                "tick": self.tick, "files": self.files, "problems": self.problems, "notes": self.notes,
                "seconds": round(self.seconds, 1)}


def read_meta(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def verify_set(stack: Stack, record: Record, timestamp: str, ids: dict[str, str] | None, window: tuple[float, float],
               sources: list[str], scratch_root: Path, database_only: bool = False) -> SetCheck:
    check = SetCheck(timestamp, sources, database_only=database_only)
    started = time.monotonic()
    try:
        _verify(stack, record, check, ids, window, scratch_root / timestamp)
    except Exception as error:  # noqa: BLE001 (whatever failed, the set was not shown restorable)
        check.problems.append(f"check failed: {type(error).__name__}: {str(error)[:300]}")
    finally:
        shutil.rmtree(scratch_root / timestamp, ignore_errors=True)
    check.restorable = not check.problems
    check.seconds = time.monotonic() - started
    return check


def _verify(stack: Stack, record: Record, check: SetCheck, ids: dict[str, str] | None, window: tuple[float, float],
            target: Path) -> None:
    if not ids or "database" not in ids:
        check.problems.append("not in the repository")
        return
    restored = restic(stack, "restore", ids["database"], "--target", str(target / "db"))
    if restored.returncode != 0:
        check.problems.append(f"restic restore of the database part failed: {restored.stderr.strip()[-300:]}")
        return
    name = f"{DATABASE}_{check.timestamp}"
    dump = next((target / "db" / f"{name}{suffix}" for suffix in (".dump", ".dump.zst")
                 if (target / "db" / f"{name}{suffix}").is_file()), None)
    meta_path = target / "db" / f"{name}.dump.meta" if dump is None else dump.with_name(dump.name + ".meta")
    if dump is None or not meta_path.is_file():
        check.problems.append(f"the database part lacks its dump or .meta: {sorted(os.listdir(target / 'db'))}")
        return
    meta = read_meta(meta_path)
    if meta.get("sha256") != sha256_file(dump):
        check.problems.append("the dump's SHA-256 is not its .meta's")
    env = target / "db" / f"{name}.env"
    if not env.is_file():
        check.problems.append("the set holds no .env")
    elif env.read_bytes() != stack.env_file.read_bytes():
        check.problems.append("the set's .env is not TMA Cloud's")
    scratch = f"soak_check_{uuid.uuid4().hex[:10]}"
    assert stack.pg is not None
    with stack.pg.connect(autocommit=True) as admin:
        tma_cloud.create_database(admin, scratch)
    try:
        if dump.name.endswith(".zst"):
            plain = dump.with_name(dump.name.removesuffix(".zst"))
            subprocess.run(["zstd", "-d", "-q", "-o", str(plain), str(dump)], check=True)
            dump = plain
        loaded = subprocess.run(["pg_restore", "-h", stack.pg.host, "-p", str(stack.pg.port), "-U", "postgres",
                                 "-d", scratch, "--no-owner", "--exit-on-error", str(dump)],
                                capture_output=True, text=True)
        if loaded.returncode != 0:
            check.problems.append(f"pg_restore failed: {loaded.stderr.strip()[-300:]}")
            return
        with stack.pg.connect(scratch, autocommit=True) as connection:
            tick, found = read_state(connection)
            rows = connection.execute("SELECT path, deleted_at IS NOT NULL, extract(epoch FROM deleted_at) FROM files"
                                      " WHERE type = 'file' AND path IS NOT NULL").fetchall()
    finally:
        with stack.pg.connect(autocommit=True) as admin:
            tma_cloud.drop_database(admin, scratch)
    check.tick = tick
    if tick is None or tick not in record.states:
        check.problems.append(f"its database holds no recorded state (newest tick {tick})")
    elif record.states[tick] != found:
        changed = sorted(key for key in found if found[key] != record.states[tick].get(key))
        check.problems.append(f"its database is not the state of tick {tick}: {changed} differ")
    live = record.timeline.live_between(*window)
    if tick is not None and tick not in live:
        check.problems.append(f"stale: tick {tick} was not live while its snapshot was taken (live then: "
                              f"{sorted(live)[:6]})")
    if check.database_only:
        if not meta.get("uploads_error"):
            check.problems.append("listed without uploads, but its .meta does not say their capture failed")
        check.notes.append(f"database part only, as listed: its uploads were not captured ({meta.get('uploads_error', '')[:120]})")
        return
    if "uploads" not in ids:
        check.problems.append("the set has no uploads part")
        return
    restored = restic(stack, "restore", ids["uploads"], "--target", str(target / "uploads"))
    if restored.returncode != 0:
        check.problems.append(f"restic restore of the uploads part failed: {restored.stderr.strip()[-300:]}")
        return
    files = tma_cloud.folder_digests(target / "uploads", skip_ours=False)
    check.files = len(files)
    ours = sorted(path for path in files if path.split("/")[0].startswith(".tma-"))
    if ours:
        check.problems.append(f"the uploads part holds the tool's own files: {ours[:5]}")
    wrong = sorted(path for path, digest in files.items() if path not in ours and record.blobs.get(path) != digest)
    if wrong:
        check.problems.append(f"{len(wrong)} upload(s) not the bytes written under their key: {wrong[:5]}")
    try:
        named = {str(item) for item in json.loads(meta.get("uploads_missing_names") or "[]")}
    except (ValueError, TypeError):
        named = set()
    missing, purged = [], []
    for path, trashed, deleted_at in rows:
        if path in files:
            continue
        # TMA Cloud purged it while the set was taken (the row seen, the blob gone): it was past its 15 days
        # in the trash when the snapshot was taken, some moment of the window (not one the set must hold),
        # or the set's .meta names it missing (a row that reached its 15 days during the dump; older code)
        due = deleted_at is not None and float(deleted_at) < window[1] - PURGE_AFTER
        if trashed and path in record.purged and (due or path in named):
            purged.append(path)
        else:
            missing.append(path)
    if missing:
        check.problems.append(f"{len(missing)} upload(s) its database references are not in it: {missing[:5]}")
    if purged:
        check.notes.append(f"{len(purged)} upload(s) TMA Cloud purged from the trash while the set was taken")

