"""Raw sequential read bandwidth of the disk under a directory, for comparing the store to."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .direct_io import ALIGN, BLOCK, IOMode, alloc_aligned, write_file

__all__ = ["measure_read_bandwidth"]


def measure_read_bandwidth(directory: str | Path, size_bytes: int = 256 << 20,
                           block_bytes: int = BLOCK, direct: bool = True) -> float:
    """Bytes per second of one sequential pass over a fresh scratch file in ``directory``.

    The file is written with O_DIRECT (buffered plus fsync where O_DIRECT is refused),
    dropped from the page cache, read back in ``block_bytes`` pieces with O_DIRECT, one
    request at a time, and deleted. Its name is a temporary-file name, so a crash leaves
    it for the store's start-up cleanup.

    Parameters
    ----------
    directory
        Where to put the scratch file: the tier root, so the same disk is measured.
    size_bytes
        Scratch file size, rounded up to ``block_bytes``; make it larger than the disk's
        cache for a steady-state number.
    block_bytes
        Bytes per read request, a multiple of 4096.
    direct
        Use O_DIRECT where the filesystem allows it.
    """
    if block_bytes <= 0 or block_bytes % ALIGN:
        raise ValueError(f"block_bytes must be a positive multiple of {ALIGN}")
    blocks = max(1, -(-size_bytes // block_bytes))
    buffer = alloc_aligned(block_bytes, pin=False).numpy()
    # Incompressible, so a compressing or deduplicating device cannot flatter the number.
    buffer[:] = np.random.default_rng(0).integers(0, 256, block_bytes, dtype=np.uint8)
    path = Path(directory) / f".bandwidth-probe.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    mode = IOMode(direct)
    try:
        staging = alloc_aligned(block_bytes, pin=False).numpy()
        write_file(path, [buffer] * blocks, mode, staging, fsync=True)
        return _timed_read(path, mode, buffer, blocks * block_bytes)
    finally:
        path.unlink(missing_ok=True)


def _timed_read(path: Path, mode: IOMode, buffer: np.ndarray, total: int) -> float:
    with mode.open(path, os.O_RDONLY | os.O_CLOEXEC) as f:
        # Without O_DIRECT this is what keeps the pass from measuring memory.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start, done = time.perf_counter(), 0
        while done < total:
            got = f.read_into(buffer, done)
            if got == 0:
                raise OSError(f"{path} ended after {done} of {total} bytes")
            done += got
        return total / (time.perf_counter() - start)
