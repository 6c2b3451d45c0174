"""The `.dump.zst` fast mode: pg_dump writes an uncompressed custom-format archive to a pipe, and this
process compresses it with zstd on the other core while pg_dump keeps going. Readers see the plain
archive again through `open_archive`, so verify, restore and drills handle both kinds alike.

zstandard is the reference zstd binding (python-zstandard); compression releases the GIL."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import zstandard

ZST_SUFFIX = ".zst"
# What `open_archive` hands out: a plain file, or a zstd stream over one; both read into a buffer.
ArchiveReader = io.FileIO | zstandard.ZstdDecompressionReader
CHUNK = 1024 * 1024


def is_compressed_stream(path: Path) -> bool:
    return path.name.endswith(ZST_SUFFIX) or path.name.endswith(ZST_SUFFIX + ".partial")


def open_output(path: Path, zstd_level: int | None) -> BinaryIO:
    """A new private (0600) file to write the dump into: plain, or compressed by zstd as it is written."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    raw = open(descriptor, "wb", buffering=CHUNK)
    if zstd_level is None:
        return raw
    return zstandard.ZstdCompressor(level=zstd_level).stream_writer(raw, closefd=True)


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
        with open_archive(path) as source, open_output(copy, None) as target:
            while chunk := source.read(CHUNK):
                target.write(chunk)
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def pump(source: io.RawIOBase | BinaryIO, target: BinaryIO) -> int:
    """Copy a stream to a writer in chunks; returns the bytes copied. Closes the target."""
    copied = 0
    try:
        while chunk := source.read(CHUNK):
            target.write(chunk)
            copied += len(chunk)
    finally:
        target.close()
    return copied
