"""Read and write one chunk file: format plus direct I/O, verified, with no bookkeeping.

A write goes to a temporary file beside the final one and is renamed into place, so a
reader (or a restart) sees a whole chunk or none. A read verifies the header, the file
size and the payload checksum, and raises rather than return anything doubtful.
"""

from __future__ import annotations

from collections.abc import Callable

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
from .direct_io import DirectFile, IOMode, Throttle, alloc_aligned, write_blocks
from .layout import ChunkLayout
from .tier_dir import TierDir

__all__ = ["ChunkMismatch", "read_chunk", "write_chunk"]

class ChunkMismatch(Exception):
    """An intact chunk, but for other tokens or another layout than the caller expects."""


def read_chunk(f: DirectFile, key: str, dst: Callable[[int], np.ndarray], *,
               token_digest: bytes | None = None, layout: ChunkLayout | None = None,
               throttle: Throttle | None = None) -> np.ndarray:
    """The verified payload of the open chunk file ``f``, which must hold ``key``.

    Parameters
    ----------
    dst
        Given the payload length, returns the ``(payload_len,)`` uint8 array to read into.
    token_digest, layout
        When given, what the chunk must hold.

    Raises
    ------
    ChunkMismatch
        The chunk is intact but not what ``token_digest`` or ``layout`` describe.
    CorruptChunk
        Anything wrong with the file (``ChecksumMismatch`` for a bad payload).
    OSError
        The file could not be read.
    """
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


def write_chunk(folder: TierDir, key: str, token_digest: bytes, layout: ChunkLayout,
                payload: np.ndarray, mode: IOMode, staging: np.ndarray,
                publish: Callable[[str], bool], *, fsync: bool = False,
                pause: Callable[[], None] | None = None) -> bool:
    """Write the chunk file for ``key`` into a temporary file, then ``publish(tmp)`` it.

    Raises ``OSError`` on failure (the temporary file is removed).

    Parameters
    ----------
    payload
        ``(layout.nbytes,)`` uint8 array.
    staging
        Aligned buffer, a multiple of 4096 bytes long, that the data streams through.
    publish
        Renames the finished temporary file into place (the commit point) and returns
        whether it did; the store does it under its capacity lock.
    fsync
        Flush the file to stable storage before it is published.
    pause
        Called before each block written (the store yields to reads there).

    Returns
    -------
    bool
        Whatever ``publish`` returned.
    """
    header = pack_header(ChunkHeader(bytes.fromhex(key), token_digest, layout, len(payload),
                                     payload_checksum(payload)))
    f, tmp = folder.create_temp(key, mode)
    try:
        with f:
            write_blocks(f, [np.frombuffer(header, np.uint8), payload], staging, fsync=fsync,
                         pause=pause)
        published = publish(tmp)
    except BaseException:
        folder.discard_temp(key, tmp)
        raise
    if not published:
        folder.discard_temp(key, tmp)
    return published
