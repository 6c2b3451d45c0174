"""Streams between this worker and a tool running in a container, over the Docker SDK's low-level exec
API: the exec's hijacked connection carries stdin one way and multiplexed stdout/stderr frames the other.

Nothing here holds more than one chunk (1 MiB) of data, plus the last 64 KiB of a tool's stderr.
"""

from __future__ import annotations

import socket
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from worker.archive import streams
from worker.errors import BackupError
from worker.pg.executors.base import ToolResult

CHUNK = 1024 * 1024
STDERR_TAIL = 64 * 1024
STDOUT, STDERR = 1, 2
PID_MARKER = "tma-backup-exec-pid="


def text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")


def read_frames(read: Callable[[int], bytes], reset_ends_output: bool = False) -> Iterator[tuple[int, bytes]]:
    """(stream, data) pieces of an exec's multiplexed output until it ends: 8-byte frame headers (stream,
    size), payloads read in pieces of at most CHUNK.

    With `reset_ends_output` (the exec has our stdin), a connection reset between two frames ends the
    output like a clean close. A tool that stops reading its input early (`pg_restore --list` reads the TOC
    only) leaves what we sent unread in the engine; when the engine then closes the connection, the kernel
    reports that as a reset instead of the end of the stream (seen once in ~150 runs under load, exit code
    0). Everything the engine wrote before it is read first; the exec's exit code then says how the tool
    ended, and an engine that really went away cannot report one. A reset inside a frame is a lost
    connection: part of the output is missing."""
    while True:
        try:
            header = read(8)
        except ConnectionResetError:
            if reset_ends_output:
                return
            raise
        if len(header) < 8:
            return
        stream, size = struct.unpack(">BxxxL", header)
        while size > 0:
            data = read(min(size, CHUNK))
            if not data:
                return
            size -= len(data)
            yield stream, data


class ExecStream:
    """One exec in the container, attached: stdin to write to, stdout and stderr frames to read."""

    def __init__(self, api: Any, container_id: str, argv: list[str], environment: dict[str, str],
                 stdin: bool = False) -> None:
        self.api = api
        self.exec_id: str = api.exec_create(
            container_id, argv, environment=environment, stdin=stdin, stdout=True, stderr=True, tty=False)["Id"]
        self._io = api.exec_start(self.exec_id, socket=True)
        # A unix or TCP socket arrives wrapped in socket.SocketIO, a TLS socket bare.
        self._socket: socket.socket = getattr(self._io, "_sock", self._io)
        self._socket.settimeout(None)  # a dump may be silent for minutes (lock waits); never time out
        self._reader = self._socket.makefile("rb", buffering=CHUNK)
        self._stop_sending = threading.Event()
        self._stdin = stdin

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """(stream, data) pieces of the multiplexed output until the exec closes it."""
        return read_frames(self._reader.read, reset_ends_output=self._stdin)

    def send_file(self, path: Path, errors: list[str]) -> None:
        """Send the file into the exec's stdin, then end its input. The tool may stop reading early
        (`pg_restore --list` reads the TOC only): that is not an error here; its exit code says."""
        try:
            with streams.open_archive(path) as handle:
                buffer = bytearray(CHUNK)
                view = memoryview(buffer)
                while not self._stop_sending.is_set() and (count := handle.readinto(buffer)):
                    self._socket.sendall(view[:count])
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as error:
            if not self._stop_sending.is_set():  # else: cut short on purpose, the tool had ended
                errors.append(f"cannot send {path.name} into the container: {error.strerror or error}")
        finally:
            try:
                self._socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop_sending(self) -> None:
        """The tool has ended (its output closed): the engine would keep swallowing whatever we still
        send, so stop and end the input now."""
        self._stop_sending.set()
        try:
            self._socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def exit_code(self, timeout: float = 30) -> int:
        """The exec's exit code. The engine reports a process ended by signal N as 128+N (as a shell
        does); that becomes -N, as subprocess reports it, so errors say "killed by signal N"."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.api.exec_inspect(self.exec_id)
            if not state.get("Running") and state.get("ExitCode") is not None:
                code = int(state["ExitCode"])
                return -(code - 128) if 128 < code <= 128 + 64 else code
            if time.monotonic() > deadline:
                raise BackupError(f"the exec {self.exec_id[:12]} did not report an exit code within {timeout:g}s")
            time.sleep(0.02)

    def abort(self) -> None:
        """Cut the connection (unblocks a reader); the tool itself is stopped separately."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        for closable in (self._reader, self._io, self._socket):
            try:
                closable.close()
            except OSError:
                pass


class StderrTail:
    """The last STDERR_TAIL bytes of a tool's stderr; the first line may carry the exec's PID marker."""

    def __init__(self, expect_pid: bool = False) -> None:
        self.data = bytearray()
        self.pid: int | None = None
        self.pid_seen = threading.Event()
        self._head: bytearray | None = bytearray() if expect_pid else None
        if not expect_pid:
            self.pid_seen.set()

    def add(self, chunk: bytes) -> None:
        if self._head is not None:
            self._head += chunk
            if b"\n" not in self._head:
                return
            line, _, chunk = bytes(self._head).partition(b"\n")
            self._head = None
            text = line.decode("ascii", "replace")
            if text.startswith(PID_MARKER) and text[len(PID_MARKER):].isdigit():
                self.pid = int(text[len(PID_MARKER):])
            else:
                chunk = line + b"\n" + chunk
            self.pid_seen.set()
        self.data += chunk
        if len(self.data) > STDERR_TAIL:
            del self.data[: len(self.data) - STDERR_TAIL]

    def finish(self) -> None:
        if self._head is not None:  # the tool ended before the marker line was complete
            self.data += self._head
            self._head = None
        self.pid_seen.set()

    def text(self) -> str:
        return text(self.data)


class DumpStream:
    """pg_dump running in the container, its stdout streamed into the output file by a thread."""

    def __init__(self, stream: ExecStream, output: Path, handle: streams.ArchiveWriter,
                 signal_process: Callable[[int], None]) -> None:
        self._signal_process = signal_process
        self._stream = stream
        self._output = output
        self._handle = handle
        self._stderr = StderrTail(expect_pid=True)
        self._problems: list[str] = []
        self._returncode: int | None = None
        self._archive_bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="tma-backup-dump-stream", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        code = 1
        try:
            write = self._handle.write
            try:
                for stream, data in self._stream.frames():
                    if stream == STDOUT:
                        write(data)
                        self._archive_bytes += len(data)
                    else:
                        self._stderr.add(data)
            finally:
                self._stderr.finish()
                try:
                    self._handle.close()
                except OSError as error:
                    self._problems.append(f"cannot write {self._output.name}: {error.strerror}")
            code = self._stream.exit_code()
        except OSError as error:
            # Writing the file failed (disk full, …) or the connection to the engine broke: stop pg_dump.
            self._problems.append(f"streaming the dump failed: {error.strerror or error}")
            self._kill_in_container()
        except Exception as error:  # docker errors: the engine went away mid-dump
            self._problems.append(f"streaming the dump failed: {str(error).splitlines()[0] if str(error) else error!r}")
            self._kill_in_container()
        finally:
            self._stream.close()
            self._returncode = code if not self._problems else (code or 1)
            self._done.set()

    def _kill_in_container(self) -> None:
        pid = self._stderr.pid
        if pid is not None:
            self._signal_process(pid)
        self._stream.abort()

    def poll(self) -> int | None:
        return self._returncode if self._done.is_set() else None

    def kill(self) -> None:
        """Stop pg_dump inside the container (by the PID its exec reported), then cut the stream."""
        if self._done.is_set():
            return
        self._stderr.pid_seen.wait(10)
        if self._stderr.pid is not None and not self._done.is_set():
            self._signal_process(self._stderr.pid)
        if not self._done.wait(10):
            self._stream.abort()

    def wait(self) -> ToolResult:
        self._thread.join()
        stderr = self._stderr.text()
        if self._problems:
            stderr = (stderr + "\n" if stderr else "") + "\n".join(f"error: {problem}" for problem in self._problems)
        return ToolResult(self._returncode if self._returncode is not None else 1, "", stderr, self._archive_bytes)


def tar_stream(archive: Path, folder: str, name: str, uid: int, gid: int) -> Iterator[bytes]:
    """A tar of one folder holding one file, generated in CHUNK pieces (nothing held but one chunk)."""
    size = archive.stat().st_size
    now = int(time.time())
    directory = tarfile.TarInfo(folder)
    directory.type, directory.mode, directory.uid, directory.gid, directory.mtime = tarfile.DIRTYPE, 0o700, uid, gid, now
    yield directory.tobuf(format=tarfile.PAX_FORMAT)
    member = tarfile.TarInfo(f"{folder}/{name}")
    member.size, member.mode, member.uid, member.gid, member.mtime = size, 0o600, uid, gid, now
    yield member.tobuf(format=tarfile.PAX_FORMAT)
    sent = 0
    with open(archive, "rb") as handle:
        while sent < size:
            chunk = handle.read(min(CHUNK, size - sent))
            if not chunk:
                raise OSError(f"{archive.name} shrank while it was being copied")
            sent += len(chunk)
            yield chunk
    yield b"\0" * (-size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE)
