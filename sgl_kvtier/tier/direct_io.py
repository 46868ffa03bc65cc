"""Aligned buffers and O_DIRECT file I/O that falls back to buffered I/O where refused.

O_DIRECT bypasses the page cache, so reading KV back neither evicts the server's own
memory nor reports page-cache speed as disk speed. It needs 4 KiB-aligned addresses,
lengths and offsets: reads into a destination that is not aligned (or the unaligned tail
of one that is) go through a per-thread aligned bounce buffer. A filesystem that refuses
O_DIRECT (EINVAL at open or at the first I/O) switches the whole store to buffered I/O,
logged once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ._log import log_once

__all__ = ["ALIGN", "BLOCK", "alloc_aligned", "as_byte_array", "IOMode", "DirectFile",
           "write_blocks", "write_file"]

ALIGN = 4096
BLOCK = 4 << 20  # bytes per read or write call: large enough to stream, small enough to throttle
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_bounce = threading.local()


class Throttle(Protocol):
    def acquire(self, nbytes: int) -> None: ...


def alloc_aligned(nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
    """A ``(nbytes,)`` uint8 CPU tensor whose data starts on an ``ALIGN`` boundary.

    Parameters
    ----------
    nbytes
        Length of the tensor.
    pin
        Page-lock it for fast host-to-device copies; ``None`` pins only when CUDA is usable.
    """
    if pin is None:
        pin = torch.cuda.is_available()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = -raw.data_ptr() % ALIGN
    return raw[start:start + nbytes]


def as_byte_array(buffer: torch.Tensor | np.ndarray | bytearray | memoryview) -> np.ndarray:
    """A flat uint8 NumPy view of a contiguous CPU tensor or writable buffer (no copy)."""
    if isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError("expected a contiguous CPU tensor")
        return buffer.reshape(-1).view(torch.uint8).numpy()
    array = np.frombuffer(buffer, dtype=np.uint8)
    if not array.flags.writeable:
        raise ValueError("expected a writable buffer")
    return array


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _bounce_buffer(nbytes: int) -> np.ndarray:
    """This thread's aligned scratch buffer, at least ``nbytes`` rounded up to ``ALIGN``."""
    need = -(-nbytes // ALIGN) * ALIGN
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < need:
        buf = _bounce.buf = alloc_aligned(max(need, BLOCK), pin=False).numpy()
    return buf[:need]


class IOMode:
    """Whether this store still uses O_DIRECT; shared by its threads, only ever turned off."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct and _O_DIRECT != 0

    def fall_back(self, path: Path | str, error: OSError) -> None:
        if self.direct:
            self.direct = False
            log_once("o_direct", logging.WARNING, "kv tier: O_DIRECT refused on %s (%s); "
                     "using buffered I/O from now on", path, error.strerror)

    def open(self, path: Path | str, flags: int, mode: int = 0o600,
             dir_fd: int | None = None) -> DirectFile:
        """Open ``path`` (relative to ``dir_fd`` when given), with O_DIRECT while this
        mode has it."""
        if self.direct:
            try:
                fd = os.open(path, flags | _O_DIRECT, mode, dir_fd=dir_fd)
                return DirectFile(fd, self, path, True)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.fall_back(path, e)
        return DirectFile(os.open(path, flags, mode, dir_fd=dir_fd), self, path, False)


class DirectFile:
    """An open file descriptor that knows whether it is in O_DIRECT mode."""

    def __init__(self, fd: int, mode: IOMode, path: Path | str, direct: bool) -> None:
        self.fd, self.mode, self.path, self.direct = fd, mode, path, direct

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_into(self, dst: np.ndarray, offset: int, throttle: Throttle | None = None) -> int:
        """Fill ``dst`` from ``offset``, in ``BLOCK`` pieces; returns bytes read (short at EOF)."""
        done = 0
        while done < len(dst):
            piece = dst[done:done + BLOCK]
            if throttle is not None:
                throttle.acquire(len(piece))
            got = self._read_piece(piece, offset + done)
            done += got
            if got < len(piece):
                break
        return done

    def write_all(self, block: np.ndarray, offset: int) -> None:
        """Write all of ``block`` (aligned, a multiple of ``ALIGN`` long) at ``offset``."""
        done = 0
        while done < len(block):
            done += self._io(os.pwrite, block[done:], offset + done)

    def _read_piece(self, dst: np.ndarray, offset: int) -> int:
        """Read all of ``dst`` unless the file ends first (``offset`` is aligned if direct)."""
        if not self.direct:
            return os.preadv(self.fd, [dst], offset)
        # The aligned part goes straight into dst; an unaligned rest goes through a bounce.
        head = len(dst) - len(dst) % ALIGN if _address(dst) % ALIGN == 0 else 0
        got = self._io(os.preadv, [dst[:head]], offset) if head else 0
        if got < head or head == len(dst):
            return got
        rest = dst[head:]
        bounce = _bounce_buffer(len(rest))
        n = min(self._io(os.preadv, [bounce], offset + head), len(rest))
        rest[:n] = bounce[:n]
        return head + n

    def _io(self, call: Callable[..., int], buffers: object, offset: int) -> int:
        try:
            return call(self.fd, buffers, offset)
        except OSError as e:
            # Some filesystems accept O_DIRECT at open and refuse it at the first I/O.
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self.mode.fall_back(self.path, e)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self.direct = False
            return call(self.fd, buffers, offset)


def _blocks(parts: Sequence[np.ndarray], staging: np.ndarray) -> Iterator[np.ndarray]:
    """Concatenate ``parts`` through ``staging``, zero-padding the end to ``ALIGN``."""
    filled = 0
    for part in parts:
        taken = 0
        while taken < len(part):
            n = min(len(staging) - filled, len(part) - taken)
            staging[filled:filled + n] = part[taken:taken + n]
            filled, taken = filled + n, taken + n
            if filled == len(staging):
                yield staging
                filled = 0
    if filled:
        pad = -filled % ALIGN
        staging[filled:filled + pad] = 0
        yield staging[:filled + pad]


def write_blocks(f: DirectFile, parts: Sequence[np.ndarray], staging: np.ndarray, *,
                 fsync: bool = False, pause: Callable[[], None] | None = None) -> None:
    """Write ``parts`` back to back into the open file ``f`` from offset 0, zero-padded
    to a multiple of ``ALIGN``.

    ``staging`` is an aligned buffer, a multiple of ``ALIGN`` long; ``pause`` runs before
    each block (the writer uses it to let reads go first).
    """
    offset = 0
    for block in _blocks(parts, staging):
        if pause is not None:
            pause()
        f.write_all(block, offset)
        offset += len(block)
    if fsync:
        os.fsync(f.fd)


def write_file(path: Path, parts: Sequence[np.ndarray], mode: IOMode, staging: np.ndarray,
               *, fsync: bool = False, pause: Callable[[], None] | None = None) -> None:
    """Create ``path`` holding ``parts`` (see :func:`write_blocks`)."""
    with mode.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC) as f:
        write_blocks(f, parts, staging, fsync=fsync, pause=pause)
