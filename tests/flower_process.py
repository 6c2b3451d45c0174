"""A real Flower process for the tests and docs/screenshot.py: `celery -A worker flower` with basic auth."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import services

USER = "flower-user"
PASSWORD = "flower-pass-7d3e"


@dataclass
class FlowerProcess:
    env: dict[str, str]
    log_path: Path
    cwd: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "FlowerProcess":
        self.port = self.port or services.free_port()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={self.port}",
             "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
            env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited: {self.log()[-3000:]}")
            try:
                if self.get("/healthcheck", auth=False)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower did not answer within {timeout}s: {self.log()[-3000:]}")

    def get(self, path: str, auth: bool | tuple[str, str] = True, timeout: float = 10) -> tuple[int, str]:
        """GET with Flower's basic auth (or the given user and password, or none)."""
        request = urllib.request.Request(self.base_url + path)
        if auth:
            user, password = auth if isinstance(auth, tuple) else (USER, PASSWORD)
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:500]}"
        return json.loads(body)

    def tasks(self) -> dict[str, dict[str, Any]]:
        return dict(self.get_json("/api/tasks"))

    def sees_worker(self, worker: str) -> bool:
        """Flower receives this worker's events (its heartbeats make it online in the metrics)."""
        status, body = self.get("/metrics")
        return status == 200 and f'flower_worker_online{{worker="{worker}"}} 1.0' in body

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
