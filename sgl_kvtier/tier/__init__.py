"""NVMe KV-cache tier: fixed-size KV chunks in checksummed files under one directory.

``keys`` names chunks, ``chunk_file`` is the on-disk format, ``tier_dir`` the only way to
the folder, ``store`` the facade that indexes, reads, writes and evicts them (``capacity``
and ``usage`` across servers sharing a folder). Nothing here imports SGLang.
"""

from __future__ import annotations

from .admission import AdmissionPolicy, AlwaysAdmit, SecondHitAdmit, make_admission
from .chunk_file import HEADER_SIZE
from .config import StoreConfig
from .direct_io import ALIGN, alloc_aligned
from .keys import chunk_keys, chunk_path, token_digest
from .layout import ChunkLayout, ModelFingerprint
from .probe import measure_read_bandwidth
from .store import ChunkStore
from .throttle import TokenBucket
from .tier_dir import UntrustedRoot

__all__ = ["ALIGN", "AdmissionPolicy", "AlwaysAdmit", "ChunkLayout", "ChunkStore",
           "HEADER_SIZE", "ModelFingerprint", "SecondHitAdmit", "StoreConfig", "UntrustedRoot",
           "TokenBucket", "alloc_aligned", "chunk_keys", "chunk_path", "make_admission",
           "measure_read_bandwidth", "token_digest"]
