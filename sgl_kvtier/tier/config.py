"""Settings of a chunk store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .admission import make_admission

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one :class:`ChunkStore`. Sizes are bytes, rates bytes per second."""

    root: str | Path
    capacity_bytes: int
    admission: Literal["always", "second_hit"] = "always"
    admission_window: int = 1 << 16  # refused keys remembered by "second_hit"
    read_bandwidth_limit: float | None = None  # emulate a slower disk
    read_threads: int = 4  # reads in flight
    direct_io: bool = True  # O_DIRECT where the filesystem allows it
    fsync: bool = False  # durability across power loss; checksums cover it otherwise
    max_queued_write_bytes: int = 512 << 20
    write_retry_interval: float = 60.0
    reads_first_max_wait: float = 0.05  # longest a write block waits for reads to drain
    summary_interval: float = 60.0

    def __post_init__(self) -> None:
        make_admission(self.admission, self.admission_window)  # validates both
        if self.capacity_bytes <= 0 or self.read_threads <= 0:
            raise ValueError("capacity_bytes and read_threads must be positive")
        if self.read_bandwidth_limit is not None and self.read_bandwidth_limit <= 0:
            raise ValueError("read_bandwidth_limit must be positive or None")
