"""Start-up recovery: rebuild the index from chunk headers, and set bad files aside.

Only renamed (committed) files carry a chunk name, so a write cut short by a crash or a
``kill -9`` leaves a temporary file, which is deleted here once its writer is gone (other
servers sharing the folder may be writing theirs right now) and was never readable. Every
chunk file's 4 KiB header is read, in parallel, and checked against its name and size;
the payload checksum is left to the first load, which verifies it anyway.

Nothing found here is trusted: symlinks, FIFOs, devices and folders under chunk or shard
names are removed (the entry itself, never what it points to), files of other users are
skipped and counted, and an error on one entry or shard never stops the scan.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import faults
from ._log import log_once
from .chunk_file import HEADER_SIZE, CorruptChunk, unpack_header
from .direct_io import IOMode, alloc_aligned
from .keys import CHUNK_SUFFIX, is_chunk_name, is_temp_name, temp_writer
from .tier_dir import TierDir, UntrustedEntry

__all__ = ["ScanResult", "scan", "disk_bytes", "trusted_file", "STALE_TEMP_SECONDS"]

# A temporary file older than this is a leftover even if its writer's pid is alive here
# (pids are reused, and another container's writer is invisible).
STALE_TEMP_SECONDS = 600.0
_UNTRUSTED = object()


@dataclass
class ScanResult:
    # (key, bytes on disk, mtime in ns), oldest first
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    files: int = 0  # chunk-named files inspected
    corrupt: int = 0
    temp_removed: int = 0
    untrusted: int = 0  # other users' files, symlinks, FIFOs, devices under chunk names
    errors: int = 0  # entries or shards that could not be listed, read or removed
    seconds: float = 0.0


def disk_bytes(st: os.stat_result) -> int:
    """Bytes a file really occupies (a sparse file claiming a terabyte occupies little)."""
    return st.st_blocks * 512


def scan(folder: TierDir, mode: IOMode, threads: int = 16) -> ScanResult:
    """Inspect every chunk file of ``folder``; remove leftovers, set bad files aside.

    Raises ``OSError`` only when the folder itself cannot be listed.
    """
    start = time.perf_counter()
    faults.hit("scan")
    result = ScanResult()
    found = _list_chunks(folder, result)
    threads = max(1, min(threads, len(found)))
    # One task per thread, not per file: per-file futures cost more than a header read.
    # Contiguous slices of the shard-ordered list, so each thread opens few shard folders.
    size = max(1, -(-len(found) // threads))
    slices = [found[i:i + size] for i in range(0, len(found), size)] or [[]]
    with ThreadPoolExecutor(threads, thread_name_prefix="kvtier-scan") as pool:
        outcomes = pool.map(lambda part: _inspect_all(folder, part, mode), slices)
    dated = []
    for part, checked in zip(slices, outcomes):
        for key, outcome in zip(part, checked):
            if outcome is _UNTRUSTED:
                result.untrusted += 1
            elif isinstance(outcome, str):
                result.corrupt += folder.quarantine(key, outcome)
            elif outcome is not None:
                dated.append(outcome)
    # Modification time stands for last use: loads touch it, in every sharing server.
    result.chunks = [(key, size, mtime) for mtime, key, size in sorted(dated, key=_by_time)]
    result.files = len(found)
    result.seconds = time.perf_counter() - start
    return result


def _by_time(entry: tuple[int, str, int]) -> tuple[int, str]:
    return entry[0], entry[1]


def _list_chunks(folder: TierDir, result: ScanResult) -> list[str]:
    keys = []
    shards, result.untrusted = folder.shards()
    for shard in shards:
        try:
            entries = folder.entries(shard, want_stat=is_temp_name)
        except OSError as e:
            _error(result, f"cannot list {folder.root / shard} ({e})")
            continue
        for name, regular, st in entries:
            if is_temp_name(name):
                if _stale(name, st):
                    removed = folder.unlink_in(shard, name)
                    result.temp_removed += removed
                    if not removed:
                        _error(result, f"cannot delete the leftover {folder.root / shard / name}")
            elif is_chunk_name(name):
                if key_of(name)[:2] != shard:  # not where its name says: never looked up
                    result.untrusted += 1
                elif regular:  # owner and mode are checked when it is opened
                    keys.append(key_of(name))
                else:  # symlink, FIFO, device, folder: remove the entry itself
                    result.untrusted += 1
                    folder.unlink_in(shard, name)
    return keys


def key_of(name: str) -> str:
    return name.removesuffix(CHUNK_SUFFIX)


def trusted_file(st: os.stat_result) -> bool:
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _stale(name: str, st: os.stat_result) -> bool:
    if time.time() - st.st_mtime > STALE_TEMP_SECONDS:
        return True
    pid = temp_writer(name)
    if pid is None:
        return True
    if pid == os.getpid():
        return False  # another store of this process is writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _error(result: ScanResult, message: str) -> None:
    result.errors += 1
    log_once("scan-error", logging.WARNING, "kv tier: %s (later scan errors are only "
             "counted)", message)


def _inspect_all(folder: TierDir, keys: list[str],
                 mode: IOMode) -> list[tuple[int, str, int] | str | None]:
    block = alloc_aligned(HEADER_SIZE, pin=False).numpy()
    outcomes, shard, shard_fd = [], None, None
    try:
        for key in keys:  # sorted by shard: each shard folder is opened once
            if key[:2] != shard:
                if shard_fd is not None:
                    os.close(shard_fd)
                    shard_fd = None
                shard = key[:2]
                try:
                    shard_fd = folder.open_folder(shard)
                except OSError:  # changed since it was listed: skip its chunks this time
                    shard_fd = None
            outcomes.append(None if shard_fd is None
                            else _inspect(folder, key, mode, block, shard_fd))
    finally:
        if shard_fd is not None:
            os.close(shard_fd)
    return outcomes


def _inspect(folder: TierDir, key: str, mode: IOMode, block: np.ndarray,
             shard_fd: int) -> tuple[int, str, int] | str | None:
    """(mtime, key, bytes) of a good chunk, a reason it is bad, or None if it vanished."""
    try:
        with folder.open_chunk(key, mode, shard_fd=shard_fd) as f:
            header = unpack_header(block[:f.read_into(block, 0)])
            st = os.fstat(f.fd)
    except FileNotFoundError:
        return None
    except UntrustedEntry:
        return _UNTRUSTED  # another user's, or writable by others: not ours to judge
    except (CorruptChunk, OSError) as e:
        return str(e)
    if header.key.hex() != key:
        return f"header names chunk {header.key.hex()}"
    if st.st_size != header.file_size:
        return f"file is {st.st_size} bytes, header says {header.file_size}"
    return st.st_mtime_ns, key, disk_bytes(st)
