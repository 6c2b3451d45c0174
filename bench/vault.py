"""The benchmark's section h: the vault (issue 22).

- One night's pull of one whole set (its database part and its uploads part) by the product, against a
  bare `restic copy` of the same two snapshots into an equivalent fresh vault, on a real S3 server
  (SeaweedFS `weed mini` on loopback) and on a local path. The pull's own restic commands are timed one
  by one (the listing of the primary, the listing of the vault, the copy, the confirming listing), so
  the gap, if any, can be taken apart.
- The bytes the vault stores on the second night (after a night of TMA Cloud's activity, bench/churn.py,
  and its uploads) against the bytes the primary stored for that night.

The sets are made as a TMA host makes them: `tma-backup backup` (in-process, BACKUP_COMPRESSION=6) of a
copy of the reference database whose `files` rows reference real uploads in an UPLOAD_DIR, with
TMA Cloud's `.env` as TMA_ENV_FILE. See bench/README.md, "h. The vault".
"""

from __future__ import annotations

import json
import os
import random
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import churn
from bench.base import NIGHT_TARGET, say
from bench.generate import MIB
from bench.proc import StepFailed, run
from bench.report import Measurement, ratio
from bench.repository import BUCKET, Repository, RepositorySection, _restic_version, tools_unavailable
from bench.uploads import EXTENSIONS, TAG_OVERHEAD, sizes_for, write_random

VAULT_DB = f"{NIGHT_TARGET}_vault"  # a copy of the reference; dropped with the night's copies (drop_leftovers)
# bench.uploads' reference folder holds 2200 MiB in 24,000 uploads: each `files` row gets one of that mean size.
UPLOAD_MEAN_BYTES = 2200 * MIB // 24000
KINDS = ("s3", "local")
# Settings a command of this section must never inherit from the shell that started the benchmark.
_FOREIGN = ("DB_", "BACKUP_", "CELERY_", "RESTORE_", "REPOSITORY_", "PG", "WORKER_", "FOLLOW_TIMEOUT", "VAULT_",
            "UPLOAD", "TMA_", "STORAGE_", "FILE_ENCRYPTION", "RESTIC_", "AWS_", "NOTIFY", "HEALTHCHECK", "R2_",
            "RUSTFS_")

# `tma-backup vault pull` in this process, the CLI as an operator types it, with the pull and each of its
# restic commands timed (the code under test is the snapshot on PYTHONPATH; the two are wrapped to time them,
# nothing else is touched).
PULL_PROBE = """
import json, resource, sys, time
started = time.perf_counter()
from worker.cli.main import cli
import worker.vault.pull as pulling
from worker.repository.restic import Restic
imported = time.perf_counter()
commands, pulled = [], {}
original_run, original_pull = Restic.run, pulling.pull

def cpu(*whose):
    return sum(usage.ru_utime + usage.ru_stime for usage in map(resource.getrusage, whose))

def timed_run(self, args, **options):
    begun, used = time.perf_counter(), cpu(resource.RUSAGE_CHILDREN)
    try:
        return original_run(self, args, **options)
    finally:
        commands.append({"command": args[0], "repository": self.names, "seconds": time.perf_counter() - begun,
                         "cpu": cpu(resource.RUSAGE_CHILDREN) - used})

def timed_pull(*args, **options):
    begun, used = time.perf_counter(), cpu(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    try:
        pulled["result"] = original_pull(*args, **options)
        return pulled["result"]
    finally:
        pulled["seconds"] = time.perf_counter() - begun
        pulled["cpu"] = cpu(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) - used

Restic.run, pulling.pull = timed_run, timed_pull
code = 0
try:
    cli.main(["vault", "pull"], prog_name="tma-backup", standalone_mode=False)
except SystemExit as error:
    code = error.code if isinstance(error.code, int) else 1
with open(sys.argv[1], "w") as out:
    json.dump({"pull_seconds": pulled.get("seconds"), "pull_cpu": pulled.get("cpu"), "result": pulled.get("result"),
               "commands": commands,
               "imports_seconds": imported - started, "exit": code}, out, default=str)
sys.exit(code)
"""


def children_cpu() -> float:
    """CPU seconds (user and system) of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def isolated(settings: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN)}
    env.update(settings)
    return env


def command_steps(commands: list[dict[str, Any]]) -> dict[str, float]:
    """The pull's restic commands by role: listing the primary, listing the vault, the copy, and the
    vault's listing after the copy (the confirmation); anything else under its own name."""
    steps: dict[str, float] = {}
    copied = False
    for command in commands:
        name, vault = command["command"], command["repository"] == "VAULT_REPOSITORY"
        if name == "copy":
            label, copied = "copy (restic copy --no-lock)", True
        elif name == "snapshots" and not vault:
            label = "listing the primary (restic snapshots)"
        elif name == "snapshots":
            label = "confirming (restic snapshots, vault)" if copied else "listing the vault (restic snapshots)"
        else:
            label = f"restic {name} ({'vault' if vault else 'primary'})"
        steps[label] = steps.get(label, 0.0) + float(command["seconds"])
    return steps


LISTINGS = ("listing the primary (restic snapshots)", "listing the vault (restic snapshots)",
            "confirming (restic snapshots, vault)")
COPY_STEP = "copy (restic copy --no-lock)"


@dataclass
class Place:
    """One kind of storage (S3 or a local path) with its primary and its vaults."""

    kind: str
    primary: Repository
    nights: Repository  # the vault that lives two nights (figure 2), made by `tma-backup vault init`
    vault: Repository  # the product's vault of the rounds (figure 1), emptied before each pull
    bare: Repository  # the bare side's: the same config and keys as `vault`, emptied before each copy
    folder: Path
    vault_id: str = ""  # the restic repository id of `vault` and `bare` (their cache folder's name)

    @property
    def backup_dir(self) -> Path:
        return self.folder / "backups"

    def state_dir(self, vault: Repository) -> Path:
        return self.folder / f"state-{'nights' if vault is self.nights else 'rounds'}"


class VaultSection(RepositorySection):
    vault_info: dict[str, Any] | None = None

    def register_vault(self) -> None:
        night = f"a night of `{self.args.churn}` churn (bench/churn.py) and its uploads"
        entries = []
        for kind, where in (("s3", "S3"), ("local", "local path")):
            entries += [
                (f"vault_pull_{kind}", f"h. tma-backup vault pull of one whole set (database and uploads part) into a "
                 f"fresh vault, {where}", f"h. vault pull, {kind}"),
                (f"vault_bare_{kind}", f"h. bare: restic copy DB_PART UPLOADS_PART into an equivalent fresh vault, {where}",
                 f"h. bare restic copy, {kind}"),
                (f"vault_open_{kind}", f"h. bare: restic cat config of the vault (opening it: key derivation), {where}",
                 f"h. restic cat config, {kind}"),
                (f"vault_primary_night1_{kind}", f"h. first night: tma-backup backup of the set into the primary "
                 f"(bytes it stored), {where}", f"h. night 1 backup, {kind}"),
                (f"vault_night1_{kind}", f"h. first night: the vault's pull (bytes it stored), {where}",
                 f"h. night 1 pull, {kind}"),
                (f"vault_primary_night2_{kind}", f"h. second night, after {night}: tma-backup backup into the primary "
                 f"(bytes it stored), {where}", f"h. night 2 backup, {kind}"),
                (f"vault_night2_{kind}", f"h. second night: the vault's pull (bytes it stored), {where}",
                 f"h. night 2 pull, {kind}"),
            ]
        for key, label, short in entries:
            self.measurements[key] = Measurement(key, label, short)

    @property
    def vault_keys(self) -> list[str]:
        return [key for key in self.measurements if key.startswith("vault_")]

    def set_vault_na(self, why: str, kind: str | None = None) -> None:
        for key in self.vault_keys:
            if kind is None or key.endswith(f"_{kind}"):
                self.measurements[key].na = why

    # ── h. ───────────────────────────────────────────────────────────────────────────────────────────
    def vault_section(self, reference: str) -> None:
        self.register_vault()
        why = tools_unavailable()
        if why:
            self.set_vault_na(why)
            return
        kinds = ("s3",) if self.args.quick else KINDS
        if "local" not in kinds:
            self.set_vault_na("not measured with --quick", "local")
        say("vault: starting a SeaweedFS S3 server on loopback")
        try:
            from tests.s3_server import start_s3

            self.s3_server = start_s3(self.work / "s3-vault")
            self.s3_server.client(timeout=10).create_bucket(Bucket=BUCKET)
        except Exception as error:  # noqa: BLE001
            self.measurements["vault_pull_s3"].errors.append(f"the S3 server did not start: {error}"[:500])
            return
        self.vault_info = {"restic": _restic_version(), "s3": "SeaweedFS weed mini on 127.0.0.1",
                           "churn": self.args.churn}
        started = time.monotonic()
        try:
            self.vault_measurements(reference, kinds)
        finally:
            self.stop_s3()
            self.vault_info["seconds"] = round(time.monotonic() - started, 1)
            say(f"vault: done in {self.vault_info['seconds']:.0f} s")

    def vault_measurements(self, reference: str, kinds: tuple[str, ...]) -> None:
        """The set's database and uploads; night 1 into each primary and its pull into the nights' vault;
        the rounds (pull against bare copy, into emptied vaults); a night of churn; night 2 and its pull."""
        primary_password, vault_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        base = self.work / "vault"
        self.uploads = base / "uploads"
        self.env_file = base / "tma-cloud.env"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env_file.write_text(f"STORAGE_DRIVER=local\nUPLOAD_DIR={self.uploads}\n"
                                 f"FILE_ENCRYPTION_KEY={secrets.token_hex(16)}\nNODE_ENV=production\n")
        self.env_file.chmod(0o600)
        say(f"vault: {VAULT_DB}, a copy of {reference}, its files' uploads in {self.uploads}")
        self.copy_database(reference, VAULT_DB)
        assert self.vault_info is not None
        self.vault_info["uploads"] = self.give_uploads()
        places = {kind: self.place(kind, base / kind, primary_password, vault_password) for kind in kinds}

        for kind, place in list(places.items()):
            if not self.attempt(self.measurements[f"vault_primary_night1_{kind}"], place.primary.wipe) \
                    or not self.night(place, 1):
                places.pop(kind)
        self.vault_info["set"] = self.set_shape(places)
        for kind, place in list(places.items()):
            if not self.attempt(self.measurements[f"vault_pull_{kind}"], lambda p=place: self.prepare_vaults(p)):
                places.pop(kind)
        self.vault_info["kdf"] = {kind: self.kdf(place.vault) for kind, place in places.items()}
        for number in range(self.args.runs):
            say(f"vault: round {number + 1}/{self.args.runs}")
            for index, place in enumerate(places.values()):
                self.vault_round(place, pull_first=(number + index) % 2 == 0)

        say(f"vault: a night of churn ({self.args.churn}) and of uploads")
        started = time.perf_counter()
        changed = churn.change_rows(self.server, VAULT_DB, self.args.churn)
        changed["uploads"] = self.uploads_night(random.Random(23))
        changed["seconds"] = round(time.perf_counter() - started, 1)
        self.vault_info["night"] = changed
        say(f"vault: {changed['rows_changed']} of {changed['rows_before']} rows changed ({changed['share']:.2%}); "
            f"uploads {changed['uploads']}")
        for place in places.values():
            self.night(place, 2)

    # ── the set ──────────────────────────────────────────────────────────────────────────────────────
    def give_uploads(self) -> dict[str, Any]:
        """Every `files` row of VAULT_DB becomes an upload as TMA Cloud keeps them: `path` a random hex key
        with its extension, `size` the plain size, the blob (random bytes, 32 more: IV and tag) in UPLOAD_DIR;
        lognormal sizes (bench.uploads') of UPLOAD_MEAN_BYTES on average. Then VACUUM FULL: full pages
        again, as the generator left them (so the night's updates move rows to the heap's end, as in g.)."""
        rng = random.Random(22)
        with self.server.connect(VAULT_DB) as connection:
            ids = [row[0] for row in connection.execute("SELECT id FROM files WHERE type = 'file' ORDER BY id")]
            sizes = sizes_for(len(ids), len(ids) * UPLOAD_MEAN_BYTES, rng) if ids else []
            keys = [f"{rng.getrandbits(64):016x}{EXTENSIONS[number % len(EXTENSIONS)]}" for number in range(len(ids))]
            self.uploads.mkdir(mode=0o700, parents=True, exist_ok=True)
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda pair: write_random(self.uploads / pair[0], pair[1]), zip(keys, sizes, strict=True)))
            written = time.perf_counter() - started
            connection.execute("CREATE TEMP TABLE uploads_map (id bigint, path text, size bigint)")
            with connection.cursor().copy("COPY uploads_map FROM STDIN") as copy:
                for row in zip(ids, keys, sizes, strict=True):
                    copy.write_row((row[0], row[1], row[2] - TAG_OVERHEAD))
            connection.execute("UPDATE files f SET path = m.path, size = m.size FROM uploads_map m WHERE f.id = m.id")
            connection.commit()
        with self.server.connect(VAULT_DB, autocommit=True) as connection:
            connection.execute("VACUUM (FULL, FREEZE, ANALYZE) files")
        self.upload_paths = dict(zip(ids, keys, strict=True))
        say(f"vault: {len(ids)} uploads, {sum(sizes) / MIB:,.1f} MiB written in {written:.1f} s")
        return {"files": len(ids), "bytes": sum(sizes), "mean_bytes": UPLOAD_MEAN_BYTES}

    def uploads_night(self, rng: random.Random) -> dict[str, int]:
        """The uploads of the night's rows: a row the churn inserted gets its blob (bench.uploads' night
        sizes) and its key; a row it renamed (`path || '.renamed'`) has its blob renamed with it."""
        with self.server.connect(VAULT_DB) as connection:
            rows = connection.execute("SELECT id, path FROM files WHERE type = 'file' ORDER BY id").fetchall()
            renamed, new = 0, []
            for ident, path in rows:
                known = self.upload_paths.get(ident)
                if known is None:
                    new.append(ident)
                elif path != known:
                    os.rename(self.uploads / known, self.uploads / path)
                    self.upload_paths[ident] = path
                    renamed += 1
            added = 0
            for ident in new:
                key = f"{rng.getrandbits(64):016x}.bin"
                size = int(rng.lognormvariate(11.5, 1.0)) + TAG_OVERHEAD
                write_random(self.uploads / key, size)
                connection.execute("UPDATE files SET path = %s, size = %s WHERE id = %s", (key, size - TAG_OVERHEAD, ident))
                self.upload_paths[ident] = key
                added += size
            connection.commit()
        return {"added": len(new), "added_bytes": added, "renamed": renamed}

    def place(self, kind: str, folder: Path, primary_password: str, vault_password: str) -> Place:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Place(kind, self.repository(kind, f"vault-primary-{kind}", primary_password),
                     self.repository(kind, f"vault-nights-{kind}", vault_password),
                     self.repository(kind, f"vault-rounds-{kind}", vault_password),
                     self.repository(kind, f"vault-bare-{kind}", vault_password), folder)

    def set_shape(self, places: dict[str, Place]) -> dict[str, Any]:
        """What the night-1 set holds (S3's if measured): its snapshots, dump and uploads."""
        for place in places.values():
            snapshots = json.loads(place.primary.restic("snapshots", "--json").stdout or b"[]")
            made = self.measurements[f"vault_primary_night1_{place.kind}"].extra
            return {"snapshots": len(snapshots), "parts": sorted(_part(item) for item in snapshots),
                    **(made[-1] if made else {})}
        return {}

    # ── the two environments ─────────────────────────────────────────────────────────────────────────
    def tma_host_env(self, place: Place) -> dict[str, str]:
        """The TMA host's `tma-backup backup`, in-process (no broker): the database and its uploads."""
        settings = {"DB_HOST": self.server.host, "DB_PORT": str(self.server.port), "DB_USER": self.server.user,
                    "DB_MODE": "host", "DB_NAME": VAULT_DB, "BACKUP_DIR": str(place.backup_dir),
                    "BACKUP_COMPRESSION": "6", "TMA_ENV_FILE": str(self.env_file), **place.primary.settings(),
                    **self.code_env()}
        if self.server.password:
            settings["DB_PASSWORD"] = self.server.password
        return isolated(settings)

    def vault_env(self, place: Place, vault: Repository) -> dict[str, str]:
        """The vault host's: the primary read with the same key (restic 0.14: one key pair per copy),
        its own repository and password, its own folder and broker; nothing of the database's."""
        settings = {**place.primary.settings(), "VAULT_REPOSITORY": vault.address,
                    "VAULT_REPOSITORY_PASSWORD": vault.password, "BACKUP_DIR": str(place.state_dir(vault)),
                    "CELERY_BROKER_URL": self.broker_url, **self.code_env()}
        if vault.s3 is not None:
            settings["VAULT_REPOSITORY_ACCESS_KEY_ID"] = settings["BACKUP_REPOSITORY_ACCESS_KEY_ID"]
            settings["VAULT_REPOSITORY_SECRET_ACCESS_KEY"] = settings["BACKUP_REPOSITORY_SECRET_ACCESS_KEY"]
        return isolated(settings)

    def copy_env(self, place: Place, vault: Repository) -> dict[str, str]:
        """A bare `restic copy` into `vault` from the primary, as an operator sets it up."""
        env = vault.restic_env()
        env.update(RESTIC_FROM_REPOSITORY=place.primary.address, RESTIC_FROM_PASSWORD=place.primary.password)
        return env

    def cli(self, arguments: list[str], env: dict[str, str], cwd: Path) -> str:
        cwd.mkdir(mode=0o700, parents=True, exist_ok=True)
        done = run([str(Path(sys.executable).with_name("tma-backup")), *arguments], env, cwd=cwd,
                   stdout=subprocess.PIPE, timeout=self.timeout)
        return (done.stdout or b"").decode(errors="replace") + done.stderr.decode(errors="replace")

    # ── nights ───────────────────────────────────────────────────────────────────────────────────────
    def night(self, place: Place, number: int) -> bool:
        """The TMA host's backup of the set into the primary, then the nights' vault's pull (on night 1
        into a vault made by `tma-backup vault init`), each with the bytes its repository gained."""
        backup, pulled = (self.measurements[f"vault_primary_night{number}_{place.kind}"],
                          self.measurements[f"vault_night{number}_{place.kind}"])
        say(f"vault: night {number}, {place.kind}: tma-backup backup")

        def back_up() -> None:
            before = place.primary.stored_bytes()
            time.sleep(1.1)  # one set a second: two runs never share a timestamp
            started = time.perf_counter()
            self.cli(["backup"], self.tma_host_env(place), place.folder)
            wall = time.perf_counter() - started
            meta = newest_meta(place.backup_dir)
            if not meta.get("uploads_part") or meta.get("uploads_missing", "0") != "0":
                raise StepFailed(f"the set has no clean uploads part (uploads_part {meta.get('uploads_part')!r}, "
                                 f"missing {meta.get('uploads_missing')!r})")
            backup.walls.append(wall)
            backup.sizes.append(place.primary.stored_bytes() - before)
            backup.extra.append({key: _number(meta.get(key)) for key in ("file_size_bytes", "uploads_files",
                                                                         "uploads_bytes", "uploads_bytes_added")})

        self.attempt(backup, back_up)
        if backup.errors:
            return False
        for path in place.backup_dir.glob(f"{VAULT_DB}_*"):  # the local backup is not measured (and takes room)
            path.unlink()
        if number == 1 and not self.attempt(pulled, lambda: self.cli(
                ["vault", "init"], self.vault_env(place, place.nights), place.state_dir(place.nights))):
            return False
        say(f"vault: night {number}, {place.kind}: tma-backup vault pull")

        def pull() -> None:
            before = place.nights.stored_bytes()
            measured = self.pull(place, place.nights)
            pulled.walls.append(measured["pull_seconds"])
            pulled.sizes.append(place.nights.stored_bytes() - before)
            pulled.steps.append(measured["steps"])

        self.attempt(pulled, pull)
        return not pulled.errors

    # ── the rounds ───────────────────────────────────────────────────────────────────────────────────
    def prepare_vaults(self, place: Place) -> bool:
        """The rounds' vault by `tma-backup vault init` (restic init --copy-chunker-params), and the bare
        side's as its twin: the same config and keys copied, so both open with the same key derivation
        (restic calibrates its scrypt parameters at init, under whatever load there is) and the same
        chunker parameters. Emptied before each side (config and keys stay): a fresh vault each time."""
        self.cli(["vault", "init"], self.vault_env(place, place.vault), place.state_dir(place.vault))
        if place.kind == "s3":
            client = self.s3_server.client(timeout=30)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=place.vault.prefix + "/"):
                for item in page.get("Contents", []):
                    key = place.bare.prefix + item["Key"][len(place.vault.prefix):]
                    client.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": item["Key"]})
        else:
            assert place.vault.path is not None and place.bare.path is not None
            shutil.copytree(place.vault.path, place.bare.path)
        config = json.loads(place.vault.restic("cat", "config").stdout)
        place.vault_id = config["id"]
        return True

    def empty(self, vault: Repository) -> None:
        """Everything of the vault but its config and keys (and, on a path, its folders) removed."""
        if vault.s3 is not None:
            client = vault.s3.client(timeout=30)
            keep = (f"{vault.prefix}/config", f"{vault.prefix}/keys/")
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=vault.prefix + "/"):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", []) if not item["Key"].startswith(keep)]
                if keys:
                    client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
            return
        assert vault.path is not None
        for folder in ("data", "index", "snapshots", "locks"):
            for path in (vault.path / folder).rglob("*"):
                if path.is_file():
                    path.unlink()

    def kdf(self, vault: Repository) -> dict[str, Any]:
        """The scrypt parameters of the vault's key (one key file, readable without the password)."""
        if vault.s3 is not None:
            client = vault.s3.client(timeout=30)
            listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{vault.prefix}/keys/").get("Contents", [])
            body = json.loads(client.get_object(Bucket=BUCKET, Key=listed[0]["Key"])["Body"].read())
        else:
            assert vault.path is not None
            body = json.loads(next((vault.path / "keys").iterdir()).read_text())
        return {key: body.get(key) for key in ("kdf", "N", "r", "p")}

    def fresh(self, place: Place, vault: Repository) -> None:
        """Untimed, before a side: the vault emptied, its restic cache (both vaults share the repository
        id) and the pull's state removed. The primary's cache stays: a vault's is warm after its first pull.
        Then `sync`: the previous side's 1.8 GB (at the reference size) are written back now, not during
        this side's copy (the S3 server's volumes and the local vaults share one disk; bench.uploads saw
        the same with its restores)."""
        self.empty(vault)
        shutil.rmtree(vault.cache / "restic" / place.vault_id, ignore_errors=True)
        shutil.rmtree(place.state_dir(vault), ignore_errors=True)
        place.state_dir(vault).mkdir(mode=0o700, parents=True)
        os.sync()

    def vault_round(self, place: Place, pull_first: bool) -> None:
        """The product's pull and the bare copy, each into its emptied vault; the sides take turns going
        first. Then `restic cat config` of the vault: what opening a repository costs now."""
        kind = place.kind
        ids = [item["id"] for item in json.loads(place.primary.restic("snapshots", "--json").stdout or b"[]")]
        sides = [self.timed_pull, self.timed_copy]
        for side in sides if pull_first else sides[::-1]:
            side(place, ids)
        item = self.measurements[f"vault_open_{kind}"]

        def open_vault() -> None:
            started = time.perf_counter()
            place.vault.restic("cat", "config")
            item.walls.append(time.perf_counter() - started)

        self.attempt(item, open_vault)

    def timed_pull(self, place: Place, ids: list[str]) -> None:
        item = self.measurements[f"vault_pull_{place.kind}"]

        def once() -> None:
            self.fresh(place, place.vault)
            measured = self.pull(place, place.vault)
            copied = (measured["result"] or {}).get("copied") or []
            if len(copied) != 1 or len(copied[0].get("parts", [])) != 2:
                raise StepFailed(f"the pull copied {copied!r}, not one set of two parts")
            held = json.loads(place.vault.restic("snapshots", "--json").stdout or b"[]")
            if len(held) != len(ids):
                raise StepFailed(f"the vault holds {len(held)} snapshots after the pull, not {len(ids)}")
            item.walls.append(measured["pull_seconds"])
            item.steps.append(measured["steps"])
            item.sizes.append(place.vault.stored_bytes())
            copy_cpu = sum(command["cpu"] for command in measured["commands"] if command["command"] == "copy")
            item.extra.append({"process_wall": round(measured["process_wall"], 3),
                               "imports": round(measured["imports_seconds"], 3),
                               "cpu": round(measured["pull_cpu"], 3), "copy_cpu": round(copy_cpu, 3)})

        self.attempt(item, once)

    def pull(self, place: Place, vault: Repository) -> dict[str, Any]:
        """`tma-backup vault pull` (PULL_PROBE), timed inside (the pull) and outside (the process)."""
        out = place.state_dir(vault) / "probe.json"
        env = self.vault_env(place, vault)
        started = time.perf_counter()
        try:
            run([sys.executable, "-c", PULL_PROBE, str(out)], env, cwd=place.state_dir(vault), timeout=self.timeout)
        except StepFailed as error:
            shown = ""
            try:
                shown = f" (pull result {json.loads(out.read_text()).get('result')!r})"[:300]
            except (OSError, ValueError):
                pass
            raise StepFailed(f"{error}{shown}") from None
        process_wall = time.perf_counter() - started
        measured: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        steps = command_steps(measured["commands"])
        steps["the rest (lock, state, Python)"] = round(measured["pull_seconds"] - sum(steps.values()), 4)
        steps["process (interpreter, imports, pull)"] = round(process_wall, 4)
        return {**measured, "steps": {name: round(value, 4) for name, value in steps.items()},
                "process_wall": process_wall}

    def timed_copy(self, place: Place, ids: list[str]) -> None:
        item = self.measurements[f"vault_bare_{place.kind}"]

        def once() -> None:
            self.fresh(place, place.bare)
            env = self.copy_env(place, place.bare)
            started, used = time.perf_counter(), children_cpu()
            run(["restic", "copy", *ids], env, cwd=place.folder, timeout=self.timeout)
            wall, cpu = time.perf_counter() - started, children_cpu() - used
            held = json.loads(place.bare.restic("snapshots", "--json").stdout or b"[]")
            if len(held) != len(ids):
                raise StepFailed(f"the bare vault holds {len(held)} snapshots after the copy, not {len(ids)}")
            item.walls.append(wall)
            item.sizes.append(place.bare.stored_bytes())
            item.extra.append({"cpu": round(cpu, 3)})

        self.attempt(item, once)

    # ── figures ──────────────────────────────────────────────────────────────────────────────────────
    def vault_paired(self) -> dict[str, Any]:
        found = {}
        for name, kind in (("vault_pull_vs_bare_copy", "s3"), ("vault_pull_vs_bare_copy_local", "local")):
            above, below = self.measurements.get(f"vault_pull_{kind}"), self.measurements.get(f"vault_bare_{kind}")
            if above and below and above.walls and len(above.walls) == len(below.walls) and not above.errors \
                    and not below.errors:
                rounds = [round(x / y, 3) for x, y in zip(above.walls, below.walls, strict=True)]
                found[name] = {"rounds": rounds, "median": round(statistics.median(rounds), 3)}
        return found

    def vault_results(self) -> dict[str, Any]:
        m = self.measurements
        if "vault_pull_s3" not in m:
            return {}

        def step(kind: str, names: tuple[str, ...]) -> float | None:
            """Median over rounds of the named steps' sum in the pull."""
            item = m[f"vault_pull_{kind}"]
            if not item.steps:
                return None
            return statistics.median(sum(steps.get(name, 0.0) for name in names) for steps in item.steps)

        def without_listings(kind: str) -> float | None:
            item = m[f"vault_pull_{kind}"]
            if not item.walls or len(item.walls) != len(item.steps):
                return None
            return statistics.median(wall - sum(steps.get(name, 0.0) for name in LISTINGS)
                                     for wall, steps in zip(item.walls, item.steps, strict=True))

        def extra(key: str, name: str) -> float | None:
            """Median over rounds of a figure the rounds recorded beside their walls (process wall, CPU)."""
            values = [value[name] for value in m[key].extra if name in value]
            return statistics.median(values) if values else None

        def night_ratio(number: int, kind: str) -> float | None:
            return ratio(m[f"vault_night{number}_{kind}"].size, m[f"vault_primary_night{number}_{kind}"].size)

        def seconds(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        figures: dict[str, Any] = {}
        for kind, suffix in (("s3", ""), ("local", "_local")):
            bare = m[f"vault_bare_{kind}"].wall
            figures.update({
                f"vault_pull_vs_bare_copy{suffix}": ratio(m[f"vault_pull_{kind}"].wall, bare),
                f"vault_second_night_bytes_ratio{suffix}": night_ratio(2, kind),
                f"vault_copy_vs_bare_copy{suffix}": ratio(step(kind, (COPY_STEP,)), bare),
                f"vault_pull_without_listings_vs_bare_copy{suffix}": ratio(without_listings(kind), bare),
                f"vault_pull_process_vs_bare_copy{suffix}": ratio(extra(f"vault_pull_{kind}", "process_wall"), bare),
                f"vault_pull_cpu_vs_bare_copy{suffix}": ratio(extra(f"vault_pull_{kind}", "cpu"),
                                                              extra(f"vault_bare_{kind}", "cpu")),
                f"vault_copy_cpu_vs_bare_copy{suffix}": ratio(extra(f"vault_pull_{kind}", "copy_cpu"),
                                                              extra(f"vault_bare_{kind}", "cpu")),
                f"vault_pull_listings_seconds{suffix}": seconds(step(kind, LISTINGS)),
                f"vault_restic_open_seconds{suffix}": seconds(m[f"vault_open_{kind}"].wall),
                f"vault_first_night_bytes_ratio{suffix}": night_ratio(1, kind),
            })
        return {**figures, "vault": dict(self.vault_info or {})}


def _part(snapshot: dict[str, Any]) -> str:
    return next((tag[5:] for tag in snapshot.get("tags") or [] if tag.startswith("part:")), "database")


def newest_meta(folder: Path) -> dict[str, str]:
    """The head of the newest `.meta` in `folder` (`key=value` lines before the row counts)."""
    metas = sorted(folder.glob("*.meta"), key=lambda path: path.stat().st_mtime)
    if not metas:
        return {}
    values = {}
    for line in metas[-1].read_text().split("\n"):
        if line.startswith("#"):
            break
        key, separator, value = line.partition("=")
        if separator:
            values[key] = value
    return values


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None
