"""Notifications (NOTIFY_URLS, Apprise's json:// webhook) and the healthcheck ping (HEALTHCHECK_URL), against
a loopback HTTP receiver in this process: real failing backups in-process and through a real worker, the
order of the pings, receivers that hang or refuse (the run is held up by NOTIFY_TIMEOUT at most and its
result is unchanged), settings refused at start-up, and `tma-backup notify test`."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests import services
from tests.conftest import TEST_PASSWORD, base_env, run_cli
from tests.helpers import error_lines, lock_of, only_backup, settings_for, wait_for
from worker.coordination.locks import held, renewal_interval

# Distinctive secrets: none may ever reach a message, a ping or the CLI's output.
REPOSITORY_PASSWORD = "Repo-Pw-Distinct-7Qx2LmZ"
ENCRYPTION_KEY = "File-Key-Distinct-93kfPq0Zr"
URL_TOKEN = "Url-Token-Distinct-5hGt8wQ"
SECRETS = (TEST_PASSWORD, REPOSITORY_PASSWORD, ENCRYPTION_KEY, URL_TOKEN)
CHECK = str(uuid.uuid4())  # the healthcheck's own UUID: the secret part of HEALTHCHECK_URL


class Receiver:
    """A loopback HTTP server that records every request (path, body, when) and answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, float]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.path, body, time.monotonic()))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def notify_url(self) -> str:
        return f"json://127.0.0.1:{self.port}/notify/{URL_TOKEN}"

    def healthcheck_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ping/{CHECK}"

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(body) for path, body, _ in self.requests if path.startswith("/notify/")]

    def pings(self) -> list[tuple[str, str]]:
        """(`start` | `success` | `fail`, body) in the order they arrived."""
        found = []
        for path, body, _ in self.requests:
            if path.startswith("/ping/"):
                tail = path.split("?")[0].removeprefix(f"/ping/{CHECK}").strip("/")
                found.append((tail or "success", body.decode()))
        return found

    def bodies(self) -> str:
        """Every body received (the paths are the URLs' own, token and all)."""
        return "\n".join(body.decode(errors="replace") for _, body, _ in self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts connections and never answers (nor reads)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)

    def stop(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def _notify_env(env: dict[str, str], receiver: Receiver, tmp_path: Path, **extra: str) -> dict[str, str]:
    """`env` with notifications to `receiver`, and secrets that must never show."""
    repository = tmp_path / "repository-never-used"
    return {**env, "NOTIFY_URLS": receiver.notify_url(), "HEALTHCHECK_URL": receiver.healthcheck_url(),
            "BACKUP_REPOSITORY_PASSWORD": REPOSITORY_PASSWORD, "FILE_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "NOTIFY_TIMEOUT": "5", **({"BACKUP_REPOSITORY": str(repository)} if "repository" in extra else {}),
            **{key: value for key, value in extra.items() if key != "repository"}}


def _assert_no_secret(text: str) -> None:
    for secret in (*SECRETS, CHECK):
        assert secret not in text


def _assert_failure_message(message: dict[str, Any], database: str, server: str, run_prefix: str) -> str:
    assert message["type"] == "failure"
    assert database in message["title"] and "FAILED" in message["title"]
    body = message["message"]
    assert f"Database : {database}" in body
    assert f"Server   : {server}" in body
    error = next(line for line in body.splitlines() if line.startswith("Error"))
    assert database in error and "does not exist" in error, body
    run = next(line for line in body.splitlines() if line.startswith("Run"))
    assert run.split(" : ")[1].startswith(run_prefix), body
    assert f"`tma-backup backup --database {database}`" in body
    return run.split(" : ")[1]


def test_a_failing_backup_in_process_sends_one_message_and_pings_start_then_fail(pg, cli_env, receiver, tmp_path):
    missing = f"no_such_db_{uuid.uuid4().hex[:8]}"
    env = _notify_env(cli_env, receiver, tmp_path, repository="yes")
    result = run_cli(["backup", "--database", missing], env, tmp_path)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert missing in line
    assert "[WARN]" not in result.stderr, "the receiver answered: no delivery warning"
    # The CLI waited for the first attempts before it exited: everything is there already.
    [message] = receiver.messages()
    _assert_failure_message(message, missing, f"{pg.host}:{pg.port}", "local-")
    assert [kind for kind, _ in receiver.pings()] == ["start", "fail"]
    fail_body = receiver.pings()[1][1]
    assert missing in fail_body and "does not exist" in fail_body and "\n" not in fail_body
    _assert_no_secret(receiver.bodies())
    _assert_no_secret(result.output)


def test_a_good_backup_in_process_pings_start_then_success_and_sends_nothing_by_default(
        cli_env, receiver, tma_db, tmp_path):
    result = run_cli(["backup"], _notify_env(cli_env, receiver, tmp_path), tmp_path)
    assert result.returncode == 0, result.output
    assert [kind for kind, _ in receiver.pings()] == ["start", "success"]
    dump, _ = only_backup(Path(cli_env["BACKUP_DIR"]), tma_db)
    assert dump.name in receiver.pings()[1][1] and "complete" in receiver.pings()[1][1]
    assert receiver.messages() == [], "NOTIFY_ON=failure: a success sends no message"
    _assert_no_secret(receiver.bodies())


def test_through_a_worker_failure_success_and_a_busy_scheduled_run_each_send_one_message(
        pg, redis_server, receiver, tma_db, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/9"
    env = _notify_env(base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=broker, WORKER_HOST="host-notify",
                               DB_NAME=tma_db, TEST_CWD=str(tmp_path)),
                      receiver, tmp_path, NOTIFY_ON="all")
    worker = services.WorkerProcess("n@host-notify", env, tmp_path / "worker.log").start()
    try:
        # A failing backup (a database that does not exist): one failure message, `start` then `fail`.
        missing = f"no_such_db_{uuid.uuid4().hex[:8]}"
        failed = run_cli(["backup", "--database", missing], env, tmp_path)
        assert failed.returncode == 1
        assert len(error_lines(failed.stderr)) == 1
        wait_for(lambda: len(receiver.pings()) >= 2 and receiver.messages(), timeout=20, what="the failure's message")
        [message] = receiver.messages()
        run_id = _assert_failure_message(message, missing, f"{pg.host}:{pg.port}", "")
        uuid.UUID(run_id)  # the Celery run id
        assert "host-notify" in message["message"] and "dump link" in message["message"], message
        assert [kind for kind, _ in receiver.pings()] == ["start", "fail"]
        assert all(f"rid={run_id}" in path for path, _, _ in receiver.requests if path.startswith("/ping/"))

        # A good backup, NOTIFY_ON=all: `start`, success, and one success message.
        receiver.requests.clear()
        good = run_cli(["backup"], env, tmp_path)
        assert good.returncode == 0, good.output
        wait_for(lambda: receiver.messages(), timeout=20, what="the success message")
        assert [kind for kind, _ in receiver.pings()] == ["start", "success"]
        [success] = receiver.messages()
        assert success["type"] == "success" and "succeeded" in success["title"]
        dump, _ = only_backup(tmp_path / "backups", tma_db)
        assert dump.name in success["message"]

        # A scheduled run that finds the database busy: skipped, one message, no ping.
        receiver.requests.clear()
        settings = settings_for(env)
        holder = lock_of(settings, tma_db, "test-holder")
        with held(holder, renewal_interval(settings)):  # renewed: the run may come later than one lease
            app = Celery("tests", broker=broker, backend=broker)
            app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                            task_default_queue="tma_backup")
            outcome = app.send_task("tma_backup.backup", kwargs={"database": tma_db, "scheduled": True}).get(30)
        assert "skipped" in outcome
        wait_for(lambda: receiver.messages(), timeout=20, what="the skip's message")
        [skipped] = receiver.messages()
        assert "SKIPPED" in skipped["title"] and "busy" in skipped["message"] and tma_db in skipped["message"]
        assert receiver.pings() == []
        time.sleep(0.5)
        assert len(receiver.messages()) == 1, "one message per event"
        _assert_no_secret(receiver.bodies())
        _assert_no_secret(worker.log())
    finally:
        worker.stop()


@pytest.mark.parametrize("receiving", ["hangs", "refuses"])
def test_an_unreachable_receiver_holds_a_failing_backup_up_by_the_timeout_at_most(cli_env, receiver, tmp_path,
                                                                                  receiving):
    timeout = 3.0
    missing = f"no_such_db_{uuid.uuid4().hex[:8]}"
    hole = BlackHole() if receiving == "hangs" else None
    port = hole.port if hole else services.free_port()

    def timed(env: dict[str, str]) -> tuple[Any, float]:
        started = time.monotonic()
        result = run_cli(["backup", "--database", missing], env, tmp_path)
        return result, time.monotonic() - started

    try:
        plain, _ = timed(cli_env)
        # The baseline for the time: the same run with a receiver that answers (Apprise loaded alike).
        _, answered = timed({**cli_env, "NOTIFY_URLS": receiver.notify_url(), "NOTIFY_TIMEOUT": str(timeout),
                             "HEALTHCHECK_URL": receiver.healthcheck_url()})
        notified, unanswered = timed({**cli_env, "NOTIFY_URLS": f"json://127.0.0.1:{port}/notify/{URL_TOKEN}",
                                      "HEALTHCHECK_URL": f"http://127.0.0.1:{port}/ping/{CHECK}",
                                      "NOTIFY_TIMEOUT": str(timeout)})
    finally:
        if hole:
            hole.stop()
    assert len(receiver.messages()) == 1, "the baseline run did send its message"
    assert notified.returncode == plain.returncode == 1
    assert error_lines(notified.stderr) == error_lines(plain.stderr)
    slowed = unanswered - answered
    assert slowed <= timeout + 1.5, f"held up {slowed:.1f}s by an unreachable receiver (NOTIFY_TIMEOUT={timeout})"
    warnings = [line for line in notified.stderr.splitlines() if line.startswith("[WARN]")]
    assert warnings and all("notification" in line or "ping" in line for line in warnings), notified.stderr
    assert any("json://127.0.0.1" in line for line in warnings)
    _assert_no_secret(notified.output)


def _bare_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DB_", "BACKUP_", "CELERY_", "NOTIFY_", "HEALTHCHECK_"))}
    return {**env, "BACKUP_DIR": str(tmp_path / "backups"), **settings}


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("NOTIFY_URLS", f"json://127.0.0.1/ok xyz://user:{URL_TOKEN}@host/p", "entry 2 is not a URL Apprise can use (scheme 'xyz'"),
    ("NOTIFY_URLS", f"slack://{URL_TOKEN}", "entry 1 is not a URL Apprise can use (scheme 'slack'"),
    ("NOTIFY_URLS", f"json://127.0.0.1/ok {URL_TOKEN}", "entry 2 is not a URL Apprise can use (no scheme://"),
    ("HEALTHCHECK_URL", f"ftp://hc.example.com/{URL_TOKEN}", "must be an http:// or https:// URL with a host"),
    ("HEALTHCHECK_URL", f"hc-ping.com/{URL_TOKEN}", "must be an http:// or https:// URL with a host"),
])
def test_a_malformed_url_is_refused_at_start_up_naming_the_variable_not_the_secret(tmp_path, variable, value, says):
    commands = [["status"]] + ([["backup"], ["notify", "test"]] if "xyz" in value else [])  # any command: a few
    for command in commands:
        result = run_cli(command, _bare_env(tmp_path, **{variable: value}), tmp_path)
        assert result.returncode == 2, result.output
        [line] = error_lines(result.stderr)
        assert line.startswith(f"[ERROR] {variable}: ") and says in line, line
        assert URL_TOKEN not in result.output and "Traceback" not in result.output


def test_notify_test_says_which_url_worked(receiver, tmp_path):
    refused = services.free_port()
    env = _bare_env(tmp_path, NOTIFY_URLS=f"{receiver.notify_url()}, json://127.0.0.1:{refused}/x/{URL_TOKEN}",
                    NOTIFY_TIMEOUT="3")
    result = run_cli(["notify", "test"], env, tmp_path)
    assert result.returncode == 1, result.output
    assert f"[OK]    entry 1: JSON (json://127.0.0.1:{receiver.port}/…): delivered" in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"[ERROR] entry 2: JSON (json://127.0.0.1:{refused}/…): not delivered"), line
    assert URL_TOKEN not in result.output
    [message] = receiver.messages()
    assert "test message" in message["title"]

    alone = run_cli(["notify", "test"], {**env, "NOTIFY_URLS": receiver.notify_url()}, tmp_path)
    assert alone.returncode == 0, alone.output
    unset = run_cli(["notify", "test"], _bare_env(tmp_path), tmp_path)
    assert unset.returncode == 2 and error_lines(unset.stderr)[0].startswith("[ERROR] NOTIFY_URLS")


def test_a_failed_drill_sends_one_message_and_a_passed_one_only_with_notify_on_all(cli_env, receiver, tma_db,
                                                                                   tmp_path):
    assert run_cli(["backup"], cli_env, tmp_path).returncode == 0
    dump, _ = only_backup(Path(cli_env["BACKUP_DIR"]), tma_db)
    env = _notify_env(cli_env, receiver, tmp_path)
    passed = run_cli(["drill"], {**env, "NOTIFY_ON": "all"}, tmp_path)
    assert passed.returncode == 0, passed.output
    [message] = receiver.messages()
    assert message["type"] == "success" and "passed" in message["title"] and dump.name in message["message"]
    assert receiver.pings() == [], "a drill is not a backup run: no ping"
    receiver.requests.clear()
    assert run_cli(["drill"], env, tmp_path).returncode == 0
    assert receiver.messages() == [], "NOTIFY_ON=failure: a passed drill sends nothing"

    with open(dump, "r+b") as handle:  # damage the backup: the drill's checks must catch it
        handle.seek(dump.stat().st_size // 2)
        handle.write(b"\0" * 64)
    failed = run_cli(["drill"], env, tmp_path)
    assert failed.returncode == 1
    [message] = receiver.messages()
    assert message["type"] == "failure" and "drill" in message["title"] and "FAILED" in message["title"]
    body = message["message"]
    assert f"Database : {tma_db}" in body and dump.name in body
    assert "Error" in body and "Run" in body and f"`tma-backup drill --database {tma_db}`" in body
    _assert_no_secret(receiver.bodies())


def test_secrets_are_scrubbed_and_the_other_events_send_one_message_each(pg, redis_server, receiver, tmp_path):
    from worker import notify

    env = _notify_env(base_env(pg, tmp_path / "backups"), receiver, tmp_path,
                      CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/10")
    settings = settings_for(env)
    assert settings.broker_url
    leaky = f"connection failed for password {TEST_PASSWORD} and key {ENCRYPTION_KEY} via {URL_TOKEN}"
    notify.backup_failed(settings, "tma", "run-1", RuntimeError(leaky), "offsite")
    notify.uploads_missing(settings, "tma", 3, "run-2", "abc123")
    notify.repository_failed(settings, "check", "restic check found 1 error", "run-3")
    name = f"tma_{uuid.uuid4().hex[:6]}"
    for _ in range(2):  # the scheduled repair runs every few minutes: one message a day
        notify.left_refusing(settings, {name: "permission denied"}, "run-4", still_refusing=lambda _: True)
    notify.left_refusing(settings, {"healthy": "could not drop a scratch"}, "run-5", still_refusing=lambda _: False)
    messages = receiver.messages()
    assert [message["title"].split(": ", 1)[1] for message in messages] == [
        "backup of 'tma' FAILED at the offsite link", "3 upload(s) MISSING from the set of 'tma'",
        "repository check FAILED", f"{name!r} is REFUSING CONNECTIONS"]
    assert "***" in messages[0]["message"] and "kept here" in messages[0]["message"]
    assert "`tma-backup repair --database " + name + "`" in messages[3]["message"]
    assert "Set      : abc123" in messages[1]["message"]
    _assert_no_secret(receiver.bodies())
