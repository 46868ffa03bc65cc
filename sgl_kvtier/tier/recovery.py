"""Start-up recovery: rebuild the index from chunk headers, and quarantine bad files.

Only renamed (committed) files carry a chunk name, so a write cut short by a crash or a
``kill -9`` leaves a temporary file, which is deleted here and was never readable. Every
chunk file's 4 KiB header is read, in parallel, and checked against its name and size;
the payload checksum is left to the first load, which verifies it anyway.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._log import log_once
from .chunk_file import HEADER_SIZE, CorruptChunk, unpack_header
from .direct_io import IOMode, alloc_aligned
from .keys import is_chunk_name, is_temp_name

__all__ = ["QUARANTINE_DIR", "ScanResult", "scan", "quarantine"]

QUARANTINE_DIR = "quarantine"
MAX_QUARANTINED = 32  # oldest quarantined files beyond this are deleted


@dataclass
class ScanResult:
    chunks: list[tuple[str, int]] = field(default_factory=list)  # (key, bytes), oldest first
    files: int = 0  # chunk-named files inspected
    corrupt: int = 0
    temp_removed: int = 0
    seconds: float = 0.0


def scan(root: Path, mode: IOMode, threads: int = 16) -> ScanResult:
    """Inspect every chunk file under ``root``; delete temporary files, quarantine bad ones."""
    start = time.perf_counter()
    result = ScanResult()
    paths = _list_chunks(root, result)
    # One task per thread, not per file: per-file futures cost more than a header read.
    threads = max(1, min(threads, len(paths)))
    slices = [paths[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="kvtier-scan") as pool:
        outcomes = pool.map(lambda part: _inspect_all(part, mode), slices)
    dated = []
    for part, found in zip(slices, outcomes):
        for path, outcome in zip(part, found):
            if isinstance(outcome, str):
                result.corrupt += quarantine(root, path, outcome)
            elif outcome is not None:
                dated.append(outcome)
    # Write time stands in for last access: the store does not touch files on reads.
    result.chunks = [(key, size) for _, key, size in sorted(dated)]
    result.files = len(paths)
    result.seconds = time.perf_counter() - start
    return result


def _list_chunks(root: Path, result: ScanResult) -> list[Path]:
    paths = []
    for directory in [root, *_shard_dirs(root)]:
        with os.scandir(directory) as entries:
            for entry in entries:
                if is_temp_name(entry.name):
                    result.temp_removed += _unlink(Path(entry.path))
                elif directory != root and is_chunk_name(entry.name):
                    paths.append(Path(entry.path))
    return paths


def _shard_dirs(root: Path) -> list[Path]:
    with os.scandir(root) as entries:
        return [Path(e.path) for e in entries
                if len(e.name) == 2 and all(c in "0123456789abcdef" for c in e.name)
                and e.is_dir(follow_symlinks=False)]


def _inspect_all(paths: list[Path], mode: IOMode) -> list[tuple[int, str, int] | str | None]:
    block = alloc_aligned(HEADER_SIZE, pin=False).numpy()
    return [_inspect(path, mode, block) for path in paths]


def _inspect(path: Path, mode: IOMode, block: np.ndarray) -> tuple[int, str, int] | str | None:
    """(mtime, key, size) of a good chunk, a reason it is bad, or None if it vanished."""
    try:
        with mode.open(path, os.O_RDONLY | os.O_CLOEXEC) as f:
            header = unpack_header(block[:f.read_into(block, 0)])
            stat = os.fstat(f.fd)
    except FileNotFoundError:
        return None
    except (CorruptChunk, OSError) as e:
        return str(e)
    if header.key.hex() != path.stem:
        return f"header names chunk {header.key.hex()}"
    if stat.st_size != header.file_size:
        return f"file is {stat.st_size} bytes, header says {header.file_size}"
    return stat.st_mtime_ns, path.stem, stat.st_size


def quarantine(root: Path, path: Path, reason: str) -> bool:
    """Move a bad chunk file into ``root/quarantine``; True unless it had already gone."""
    folder = root / QUARANTINE_DIR
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        os.rename(path, folder / f"{path.name}.{time.time_ns()}")
    except FileNotFoundError:
        return False
    except OSError:
        _unlink(path)  # cannot set it aside (read-only disk?): at least never read it again
    log_once("quarantine", logging.WARNING, "kv tier: quarantined %s: %s (later bad chunks "
             "are counted in stats, not logged)", path, reason)
    _trim(folder)
    return True


def _trim(folder: Path) -> None:
    try:
        names = os.listdir(folder)
    except OSError:
        return
    names.sort(key=_quarantine_time)
    for name in names[:-MAX_QUARANTINED]:
        _unlink(folder / name)


def _quarantine_time(name: str) -> int:
    suffix = name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False
