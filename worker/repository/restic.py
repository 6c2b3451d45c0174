"""Run the `restic` binary against BACKUP_REPOSITORY: secrets in its environment only, its failures
turned into one line an operator can act on, and a watchdog for a server that stopped answering.

restic retries a vanished server for a quarter of an hour or more (seen: still retrying after five
minutes of connection refused), and waits forever for a server that accepts and never answers. A run
must fail in bounded time instead: every restic command is watched (`worker.repository.watchdog`), and
after REPOSITORY_STALL_TIMEOUT seconds without progress (no byte moved, no CPU used, or nothing but
retries) it is killed and reported.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from worker.children import die_with_parent
from worker.errors import BackupError
from worker.repository.access import Access, primary_access
from worker.repository.watchdog import Watchdog, kill_group
from worker.settings import Settings

# What restic inherits from this process's environment; everything else (TMA Cloud's own AWS_* for its
# bucket, RESTIC_* of whoever started the worker) is left out, so nothing redirects it.
_INHERITED = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
              "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
JsonLine = Callable[[dict[str, Any]], None]
READ_ONLY = frozenset({"snapshots", "ls", "dump", "cat", "restore", "stats"})


class RepositoryError(BackupError):
    """The repository could not be used; `str()` is one line saying why and what to do."""


class RepositoryMissing(RepositoryError):
    """No repository at the address (or not initialised)."""


class RepositoryLocked(RepositoryError):
    """restic found a lock held by another restic process."""


def redacted(address: str) -> str:
    """The repository's address without a password (`rest:https://user:pw@host/` → `user:***@`)."""
    scheme, sep, rest = address.partition(":")
    if not sep or "://" not in rest or "@" not in rest:
        return address
    parts = urlsplit(rest)
    if parts.password is None:
        return address
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return f"{scheme}:{urlunsplit(parts._replace(netloc=netloc))}"


def restic_binary() -> str:
    found = shutil.which("restic")
    if not found:
        raise RepositoryError("restic is not installed on this host: apt-get install restic (0.14 or newer)")
    return found


def restic_environment(settings: Settings, access: Access | None = None, source: Access | None = None) -> dict[str, str]:
    """restic's environment for the repository `access` names (default: BACKUP_REPOSITORY), and for
    `source` as the repository `copy` and `init --copy-chunker-params` read from (RESTIC_FROM_*)."""
    access = access or primary_access(settings)
    if not access.address:
        raise RepositoryError(f"{access.names} is not set: there is no repository to use")
    environment = {key: os.environ[key] for key in _INHERITED if key in os.environ}
    environment.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    environment.update({
        "RESTIC_REPOSITORY": access.address,
        "TZ": "UTC",  # `backup --time` and the snapshots' times are the backups' own UTC timestamps
        "RESTIC_PROGRESS_FPS": "2",
    })
    _password(environment, access, "RESTIC")
    if source is not None:
        environment["RESTIC_FROM_REPOSITORY"] = source.address
        _password(environment, source, "RESTIC_FROM")
    keys = access.keys or (source.keys if source is not None else None)  # one pair for both (settings check)
    if keys is not None:
        environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"] = keys
    if "HOME" not in environment and "XDG_CACHE_HOME" not in environment:
        environment["RESTIC_CACHE_DIR"] = "/tmp/tma-backup-restic-cache"
    return environment


def _password(environment: dict[str, str], access: Access, prefix: str) -> None:
    if access.password is not None:
        environment[f"{prefix}_PASSWORD"] = access.password.get_secret_value()
    elif access.password_file is not None:
        environment[f"{prefix}_PASSWORD_FILE"] = str(access.password_file)


def explain(stderr: str, address: str, names: str = "BACKUP_REPOSITORY") -> RepositoryError:
    """restic's stderr as one line an operator can act on; `names`: the settings naming that repository."""
    text = stderr.strip()
    shown = redacted(address)
    lowered = text.lower()
    if "wrong password" in lowered or "no key found" in lowered:
        return RepositoryError(f"the repository at {shown} refused the password ({names}_PASSWORD"
                               "[_FILE]): wrong password, or another repository at that address")
    if any(code in text for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied",
                                     "Access Denied", "InvalidSecretKey")) or any(
            sign in lowered for sign in ("request signature we calculated does not match",
                                         "access key id you provided does not exist", "access denied")):
        return RepositoryError(f"the repository's storage at {shown} refused the credentials "
                               f"({names}_ACCESS_KEY_ID / {names}_SECRET_ACCESS_KEY)")
    if "repository is already locked" in lowered or "unable to create lock" in lowered:
        return RepositoryLocked(f"the repository at {shown} is locked by another restic process "
                                "(a stale lock of a killed run is removed at the next run)")
    if "no space left on device" in lowered:
        where = next((line.strip() for line in text.splitlines() if "no space left on device" in line.lower()), "")
        return RepositoryError(f"no space left on device: restic could not write what it read from {shown} "
                               f"({where[:200]})")
    unreachable = ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                   "connection reset", "stopped answering", "tls handshake", "dial tcp")
    missing = ("is there a repository at the following location", "repository does not exist",
               "unable to open config file", "nosuchbucket", "does not exist")
    if any(sign in lowered for sign in unreachable):
        return RepositoryError(f"cannot reach the repository at {shown}: {_detail(text)}")
    if any(sign in lowered for sign in missing):
        create = "tma-backup vault init" if names == "VAULT_REPOSITORY" else "tma-backup repository init"
        return RepositoryMissing(f"no restic repository at {shown}: check {names}, or create it once "
                                 f"with `{create}`")
    return RepositoryError(f"restic failed on {shown}: {_detail(text) or 'no message'}")


def _detail(text: str) -> str:
    """The most telling line of restic's stderr: its `Fatal:` line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Fatal:"):
            return line.removeprefix("Fatal:").strip()[:300]
    return lines[-1][:300] if lines else ""


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


class Restic:
    """One repository, as the settings name it. Every command runs with `--json` where restic has it,
    in a process of its own that dies with this one."""

    def __init__(self, settings: Settings, access: Access | None = None, source: Access | None = None) -> None:
        access = access or primary_access(settings)
        self.binary = restic_binary()
        self.address = access.address
        self.names = access.names
        self.environment = restic_environment(settings, access, source)
        self.stall_timeout = settings.REPOSITORY_STALL_TIMEOUT

    @property
    def shown(self) -> str:
        return redacted(self.address)

    def run(self, args: list[str], *, cwd: Path | None = None, on_json: JsonLine | None = None,
            stdout: IO[bytes] | None = None, check: bool = True) -> Outcome:
        """Run `restic ARGS`. `on_json` gets each JSON line of stdout as it comes (progress); `stdout`
        (a binary file) takes stdout raw instead (`restic dump`). With `check`, raises RepositoryError
        when restic fails; without, returns its outcome (the caller reads its exit code). A command
        that stalls raises RepositoryError either way.

        A restic lock in the way is a killed run's (every user of the repository holds its lock, see
        `worker.repository.lock`): `restic unlock` removes it if it is stale, and the command runs once
        more, with or without `check`."""
        outcome = self._run_once(args, cwd, on_json, stdout)
        if outcome.returncode != 0 and args[:1] != ["unlock"] and self._locked(outcome):
            self.run(["unlock"])
            outcome = self._run_once(args, cwd, on_json, stdout)
        if check and outcome.returncode != 0:
            raise explain(outcome.stderr, self.address, self.names)
        return outcome

    def _locked(self, outcome: Outcome) -> bool:
        return isinstance(explain(outcome.stderr, self.address, self.names), RepositoryLocked)

    def _run_once(self, args: list[str], cwd: Path | None, on_json: JsonLine | None,
                  stdout: IO[bytes] | None) -> Outcome:
        # Readers take no restic lock: our own repository lock already keeps them from a prune, and two
        # locking restic processes at once can stall each other for a minute (restic 0.14 retries loading
        # a lock file the other one has just removed).
        argv = [self.binary, *args, *(["--no-lock"] if args[:1] and args[0] in READ_ONLY else [])]
        with self._process(argv, cwd) as (process, errors, watchdog):
            collected: list[str] = []
            assert process.stdout is not None
            if stdout is not None:
                assert isinstance(process.stdout, io.BufferedReader)
                while block := process.stdout.read1(1024 * 1024):
                    watchdog.piped(len(block))
                    stdout.write(block)
            else:
                for raw in process.stdout:
                    watchdog.piped(len(raw))
                    line = raw.decode("utf-8", "replace")
                    collected.append(line)
                    if on_json is not None and line.startswith("{"):
                        try:
                            on_json(json.loads(line))
                        except ValueError:
                            pass
            returncode = process.wait()
        outcome = Outcome(returncode, "".join(collected), "".join(errors))
        if watchdog.stalled:
            detail = _detail(outcome.stderr)
            raise RepositoryError(f"cannot reach the repository at {self.shown}: it stopped answering for "
                                  f"{self.stall_timeout} s (REPOSITORY_STALL_TIMEOUT); "
                                  + (f"last error: {detail}" if detail else "restic waited without a word and was stopped"))
        return outcome

    def json(self, args: list[str]) -> Any:
        outcome = self.run([*args, "--json"])
        try:
            return json.loads(outcome.stdout or "null")
        except ValueError:
            raise RepositoryError(f"restic printed something other than JSON for `{args[0]}`") from None

    @contextmanager
    def _process(self, argv: list[str], cwd: Path | None) -> Iterator[tuple[subprocess.Popen[bytes], list[str], Watchdog]]:
        process = subprocess.Popen(
            argv, cwd=cwd, env=self.environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, preexec_fn=die_with_parent, start_new_session=True,
        )
        errors: list[str] = []
        watchdog = Watchdog(process, self.stall_timeout)

        def read_errors() -> None:
            assert process.stderr is not None
            for raw_line in process.stderr:
                watchdog.piped(len(raw_line))
                line = raw_line.decode("utf-8", "replace")
                errors.append(line)
                watchdog.error_line(line)

        reader = threading.Thread(target=read_errors, name="restic-stderr", daemon=True)
        reader.start()
        try:
            with watchdog:
                try:
                    yield process, errors, watchdog
                except BaseException:
                    kill_group(process)
                    raise
                finally:
                    process.wait()
        finally:
            reader.join(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
