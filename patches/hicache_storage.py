"""The tier's store as an L3 for SGLang's HiCache (GPU users of hierarchical caching).

Interface (SGLang 0.5.23): ``sglang.srt.mem_cache.hicache_storage.HiCacheStorage``, loaded by
``--hicache-storage-backend dynamic`` with the zero-copy v1 calls::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
        "module_path": "sgl_kvtier.patches.hicache_storage",
        "class_name": "KVTierHiCacheStorage", "interface_v1": 1,
        "path": "/nvme/kvtier", "capacity": "2TB"}'

The other keys are the ``tier`` section of the kvtier config (``path``, ``capacity``,
``admission``, ``read_bandwidth_limit``, ``io_threads``, ``direct_io``), validated the same way.
Pages are stored whole, as HiCache's host pool lays them out, under HiCache's own page
hashes; every load is checksummed like the radix-cache backend's chunks. The v1 calls copy
once between a page of the host pool and an aligned buffer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from sgl_kvtier.config import ConfigError, config_from_dict
from sgl_kvtier.tier import ChunkLayout, ChunkStore, StoreConfig, alloc_aligned

log = logging.getLogger("sgl_kvtier")
_SGLANG_KEYS = {"backend_name", "module_path", "class_name", "interface_v1", "interface_v2"}


def tier_config(extra: dict | None):
    """The ``tier`` settings from HiCache's extra config (SGLang's own keys removed)."""
    mine = {k: v for k, v in (extra or {}).items() if k not in _SGLANG_KEYS}
    try:
        return config_from_dict({"tier": {"enabled": True, **mine}},
                                where="--hicache-storage-backend-extra-config").tier
    except ConfigError as e:
        raise ValueError(str(e)) from None


class KVTierHiCacheStorage(HiCacheStorage):
    """HiCache L3 over a :class:`~sgl_kvtier.tier.ChunkStore` (one directory per rank)."""

    def __init__(self, storage_config, kwargs=None):
        extra = getattr(storage_config, "extra_config", None)
        config = tier_config(extra)
        c = storage_config
        self.scope = (f"{c.model_name}|tp{c.tp_rank}/{c.tp_size}|pp{c.pp_rank}/{c.pp_size}|"
                      f"mla{int(c.is_mla_model)}|page_first{int(c.is_page_first_layout)}")
        root = Path(config.path).expanduser() / (
            f"hicache-tp{c.tp_rank}-of-{c.tp_size}-pp{c.pp_rank}")
        self.store = ChunkStore(StoreConfig.from_tier(config, root))
        self.layout: ChunkLayout | None = None
        self._staging: list[torch.Tensor] = []
        log.info("sgl_kvtier: HiCache L3 at %s (%d pages found)", root,
                 self.store.stats()["chunks"])

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = mem_pool_host.get_data_page(0, flat=True)  # keys and values of one page
        # The store checks sizes and dtype through a layout: a page is one flat "token".
        self.layout = ChunkLayout(1, 1, page.numel() // 2, str(page.dtype), 1)

    # ---------------------------------------------------------------- zero-copy (v1)

    def batch_exists(self, keys, extra_info=None) -> int:
        return self.store.contains_prefix([self._key(k) for k in keys])

    def batch_get_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        ps = self.mem_pool_host.page_size
        staging = self._buffers(len(keys))
        loaded = self.store.load([self._key(k) for k in keys], layout=self.layout,
                                 out=staging)
        results = []
        for i, payload in enumerate(loaded):
            ok = payload is not None and all(results)  # HiCache uses the leading run only
            if ok:
                page = payload.view(self.layout.torch_dtype)
                self.mem_pool_host.set_from_flat_data_page(int(host_indices[i * ps]), page)
            results.append(ok)
        return results

    def batch_set_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        ps = self.mem_pool_host.page_size
        results = []
        for i, key in enumerate(keys):
            page = self.mem_pool_host.get_data_page(int(host_indices[i * ps]), flat=True)
            payload = alloc_aligned(self.layout.nbytes)
            payload.view(page.dtype).copy_(page)
            self.store.put(self._key(key), None, payload, self.layout)
            results.append(True)  # queued, refused by admission, or full: never an error
        return results

    # -------------------------------------------------------- generic (one copy more)

    def exists(self, key) -> bool:
        return self.store.contains_prefix([self._key(key)]) == 1

    def get(self, key, target_location=None, target_sizes=None):
        out = self.store.load([self._key(key)], layout=self.layout)[0]
        if out is None:
            return None
        page = out.view(self.layout.torch_dtype)
        if target_location is not None:
            target_location.view(-1).copy_(page)
            return target_location
        return page

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        if value is None or self.layout is None:
            return False
        payload = alloc_aligned(self.layout.nbytes)
        payload.view(value.dtype).copy_(value.reshape(-1))
        self.store.put(self._key(key), None, payload, self.layout)
        return True

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values or []))

    # ------------------------------------------------------------------------ rest

    def clear(self) -> None:
        self.store.clear()

    def get_stats(self):
        return None  # SGLang expects its own metrics type here; ours are in store.stats()

    def close(self) -> None:
        self.store.close(timeout=30.0)

    def _key(self, page_hash: str) -> str:
        # Our keys are SHA-256 hex: scope HiCache's page hash by model and rank.
        return hashlib.sha256(f"{self.scope}|{page_hash}".encode()).hexdigest()

    def _buffers(self, n: int) -> list[torch.Tensor]:
        while len(self._staging) < n:
            self._staging.append(alloc_aligned(self.layout.nbytes))
        return self._staging[:n]
