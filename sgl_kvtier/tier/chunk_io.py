"""Read and write one chunk file: format plus direct I/O, verified, with no bookkeeping.

A write goes to a temporary file beside the final one and is renamed into place, so a
reader (or a restart) sees a whole chunk or none. A read verifies the header, the file
size and the payload checksum, and raises rather than return anything doubtful.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .chunk_file import (
    HEADER_SIZE,
    ChecksumMismatch,
    ChunkHeader,
    CorruptChunk,
    pack_header,
    payload_checksum,
    unpack_header,
)
from .direct_io import IOMode, Throttle, alloc_aligned, write_file
from .keys import temp_path
from .layout import ChunkLayout

__all__ = ["ChunkMismatch", "read_chunk", "write_chunk"]

_READ = os.O_RDONLY | os.O_CLOEXEC


class ChunkMismatch(Exception):
    """An intact chunk, but for other tokens or another layout than the caller expects."""


def read_chunk(path: Path, key: str, dst: Callable[[int], np.ndarray], mode: IOMode, *,
               token_digest: bytes | None = None, layout: ChunkLayout | None = None,
               throttle: Throttle | None = None) -> np.ndarray:
    """The verified payload of the chunk file for ``key`` at ``path``.

    Parameters
    ----------
    dst
        Given the payload length, returns the ``(payload_len,)`` uint8 array to read into.
    token_digest, layout
        When given, what the chunk must hold.

    Raises
    ------
    FileNotFoundError
        The file is gone.
    ChunkMismatch
        The chunk is intact but not what ``token_digest`` or ``layout`` describe.
    CorruptChunk
        Anything wrong with the file (``ChecksumMismatch`` for a bad payload).
    OSError
        The file could not be read.
    """
    with mode.open(path, _READ) as f:
        block = alloc_aligned(HEADER_SIZE, pin=False).numpy()
        header = unpack_header(block[:f.read_into(block, 0)])
        if header.key != bytes.fromhex(key):
            raise CorruptChunk(f"header names chunk {header.key.hex()}")
        if f.size() != header.file_size:
            raise CorruptChunk(f"file is {f.size()} bytes, header says {header.file_size}")
        _check_expected(header, token_digest, layout)
        payload = dst(header.payload_len)
        if f.read_into(payload, HEADER_SIZE, throttle) != header.payload_len:
            raise CorruptChunk("file ended inside the payload")
    if payload_checksum(payload) != header.payload_checksum:
        raise ChecksumMismatch("payload checksum mismatch")
    return payload


def _check_expected(header: ChunkHeader, digest: bytes | None,
                    layout: ChunkLayout | None) -> None:
    wrong = []
    if digest is not None and digest != header.token_digest:
        wrong.append("tokens")
    if layout is not None and layout != header.layout:
        wrong.append(f"layout {header.layout}")
    if wrong:
        raise ChunkMismatch(" and ".join(wrong))


def write_chunk(path: Path, key: str, token_digest: bytes, layout: ChunkLayout,
                payload: np.ndarray, mode: IOMode, staging: np.ndarray, *, fsync: bool = False,
                pause: Callable[[], None] | None = None) -> None:
    """Create the chunk file for ``key`` at ``path`` atomically; raises ``OSError`` on failure.

    Parameters
    ----------
    payload
        ``(layout.nbytes,)`` uint8 array.
    staging
        Aligned buffer, a multiple of 4096 bytes long, that the data streams through.
    fsync
        Flush file and directory to stable storage before returning.
    pause
        Called before each block written (the store yields to reads there).
    """
    header = pack_header(ChunkHeader(bytes.fromhex(key), token_digest, layout, len(payload),
                                     payload_checksum(payload)))
    tmp = temp_path(path)
    try:
        write_file(tmp, [np.frombuffer(header, np.uint8), payload], mode, staging,
                   fsync=fsync, pause=pause)
        os.rename(tmp, path)  # the commit point
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
