"""The `.dump.zst` fast mode: pg_dump writes an uncompressed custom-format archive to a pipe, and the
zstd tool compresses it on the other core while pg_dump keeps going. Readers see the plain archive
again through `open_archive`, so verify, restore and drills handle both kinds alike.

The writer is the zstd tool, not python-zstandard, for one option the binding does not expose:
`--rsyncable`, which cuts the stream at points chosen by the content, so an unchanged stretch of the
archive compresses to the same bytes every night and the off-site repository stores it once
(bench/README.md, "Deduplication and compression"). python-zstandard reads the result (a plain zstd
stream); its decompression releases the GIL."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from worker.children import die_with_parent

ZST_SUFFIX = ".zst"
# What `open_archive` hands out: a plain file, or a zstd stream over one; both read into a buffer.
ArchiveReader = io.FileIO | zstandard.ZstdDecompressionReader
CHUNK = 1024 * 1024


def is_compressed_stream(path: Path) -> bool:
    return path.name.endswith(ZST_SUFFIX) or path.name.endswith(ZST_SUFFIX + ".partial")


ZSTD_TOOL_MISSING = "BACKUP_COMPRESSION=zstd-stream needs the zstd tool on the worker (apt-get install zstd)"


def zstd_tool() -> str | None:
    return shutil.which("zstd")


class ArchiveWriter(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def close(self) -> None: ...


class ZstdToolWriter:
    """Bytes written here go through `zstd --rsyncable` into the file; close() waits for zstd and
    raises OSError (ENOSPC for a full disk, as a plain file would) when zstd did not finish well."""

    def __init__(self, descriptor: int, level: int) -> None:
        tool = zstd_tool()
        if tool is None:
            raise OSError(errno.ENOENT, ZSTD_TOOL_MISSING)
        # -T1: one compression thread beside the reading one (rsyncable needs zstd's threaded mode).
        self._process = subprocess.Popen([tool, "-q", f"-{level}", "-T1", "--rsyncable", "-c"],
                                         stdin=subprocess.PIPE, stdout=descriptor, stderr=subprocess.PIPE,
                                         preexec_fn=die_with_parent)
        self._closed = False

    def write(self, data: bytes, /) -> int:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(data)
        except BrokenPipeError:
            self._closed = True
            self._raise_failure(self._process.wait(), stopped_reading=True)
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        returncode = self._process.wait()
        if returncode != 0:
            self._raise_failure(returncode)
        self._stderr()

    def _stderr(self) -> str:
        assert self._process.stderr is not None
        said = self._process.stderr.read().decode("utf-8", "replace").strip()
        self._process.stderr.close()
        return said

    def _raise_failure(self, returncode: int, stopped_reading: bool = False) -> None:
        said = self._stderr()
        if "No space left" in said:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        last = said.splitlines()[-1] if said else (
            "stopped reading its input" if stopped_reading and returncode == 0 else f"exited with {returncode}")
        raise OSError(errno.EIO, f"zstd: {last}")


def _private_file(path: Path) -> BinaryIO:
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb", buffering=CHUNK)


def open_output(path: Path, zstd_level: int | None) -> ArchiveWriter:
    """A new private (0600) file to write the dump into: plain, or compressed by zstd as it is written."""
    if zstd_level is None:
        return _private_file(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return ZstdToolWriter(descriptor, zstd_level)
    finally:
        os.close(descriptor)  # zstd holds its own copy


def open_archive(path: Path) -> ArchiveReader:
    """The plain custom-format archive's bytes, decompressed on the fly for a `.dump.zst`."""
    raw = open(path, "rb", buffering=0)
    if not is_compressed_stream(path):
        return raw
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)


@contextmanager
def plain_archive(path: Path) -> Iterator[Path]:
    """A seekable plain archive for `pg_restore --jobs`: the file itself, or for a `.dump.zst` a private
    decompressed copy beside it, removed afterwards."""
    if not is_compressed_stream(path):
        yield path
        return
    copy = path.with_name(f".{path.name}.restore-{uuid.uuid4().hex[:8]}.dump")
    try:
        with open_archive(path) as source, _private_file(copy) as target:
            while chunk := source.read(CHUNK):
                target.write(chunk)
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def pump(source: io.RawIOBase | BinaryIO, target: ArchiveWriter) -> int:
    """Copy a stream to a writer in chunks; returns the bytes copied. Closes the target."""
    copied = 0
    try:
        while chunk := source.read(CHUNK):
            target.write(chunk)
            copied += len(chunk)
    finally:
        target.close()
    return copied
