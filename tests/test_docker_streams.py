"""An exec's output stream when the engine resets the connection (`worker.pg.executors.docker_streams`).

A tool that stops reading its stdin early (`pg_restore --list`) leaves what we sent unread in the engine;
when the engine then closes the connection, Linux reports a reset instead of the end of the stream. Seen
under load in the Docker tests (`lost the connection to pg_restore … Connection reset by peer`, exit code
0), about once in 150 runs. Here the kernel makes the same reset on a real Unix socket pair, every time:
the peer closes while bytes we sent sit unread in its receive queue."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from worker.pg.executors.docker_streams import STDERR, STDOUT, read_frames


def _frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, engine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, engine
    ours.close()
    engine.close()


def _engine_closes_with_our_input_unread(ours: socket.socket, engine: socket.socket, output: bytes) -> None:
    engine.sendall(output)
    ours.sendall(b"input the tool never read" * 1000)
    engine.close()


def _read_all(ours: socket.socket, reset_ends_output: bool) -> list[tuple[int, bytes]]:
    reader = ours.makefile("rb", buffering=1024 * 1024)
    return list(read_frames(reader.read, reset_ends_output=reset_ends_output))


def test_the_kernel_reports_a_reset_when_the_engine_closes_with_our_input_unread(connection):
    ours, engine = connection
    _engine_closes_with_our_input_unread(ours, engine, _frame(STDOUT, b"toc"))
    with pytest.raises(ConnectionResetError):
        _read_all(ours, reset_ends_output=False)


def test_a_reset_between_frames_ends_the_output_of_an_exec_with_stdin_and_keeps_every_frame(connection):
    ours, engine = connection
    _engine_closes_with_our_input_unread(ours, engine, _frame(STDOUT, b"; Archive created at") + _frame(STDERR, b"note"))
    assert _read_all(ours, reset_ends_output=True) == [(STDOUT, b"; Archive created at"), (STDERR, b"note")]


def test_a_reset_inside_a_frame_is_a_lost_connection_even_with_stdin(connection):
    ours, engine = connection
    cut = _frame(STDOUT, b"x" * 100)[:50]
    _engine_closes_with_our_input_unread(ours, engine, cut)
    with pytest.raises(ConnectionResetError):
        _read_all(ours, reset_ends_output=True)
