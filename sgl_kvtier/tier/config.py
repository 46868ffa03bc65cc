"""Settings of a chunk store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .admission import make_admission

if TYPE_CHECKING:
    from sgl_kvtier.config import TierConfig

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one :class:`ChunkStore`. Sizes are bytes, rates bytes per second.

    A server builds it from the ``tier`` section with :meth:`from_tier`; the defaults of
    the fields both have agree (tested).
    """

    root: str | Path
    capacity_bytes: int
    admission: Literal["always", "second_hit"] = "second_hit"
    admission_window: int = 1 << 16  # refused keys remembered by "second_hit"
    read_bandwidth_limit: float | None = None  # emulate a slower disk
    read_threads: int = 4  # reads in flight
    direct_io: bool = True  # O_DIRECT where the filesystem allows it
    fsync: bool = False  # durability across power loss; checksums cover it otherwise
    max_queued_write_bytes: int = 512 << 20
    write_retry_interval: float = 60.0
    reads_first_max_wait: float = 0.05  # longest a write block waits for reads to drain
    summary_interval: float = 60.0

    @classmethod
    def from_tier(cls, tier: TierConfig, root: str | Path) -> StoreConfig:
        """The store of one rank folder ``root`` under a ``tier`` config section."""
        return cls(root=root, capacity_bytes=tier.capacity, admission=tier.admission,
                   read_bandwidth_limit=tier.read_bandwidth_limit,
                   read_threads=tier.io_threads, direct_io=tier.direct_io)

    def __post_init__(self) -> None:
        make_admission(self.admission, self.admission_window)  # validates both
        if self.capacity_bytes <= 0 or self.read_threads <= 0:
            raise ValueError("capacity_bytes and read_threads must be positive")
        if self.read_bandwidth_limit is not None and self.read_bandwidth_limit <= 0:
            raise ValueError("read_bandwidth_limit must be positive or None")
