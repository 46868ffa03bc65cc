"""Opening the NVMe tier for one scheduler process: folder, fingerprint, store, service.

Everything that can go wrong here (a folder that cannot be trusted, a storage error, a
bug) ends in one log line and a server that serves without the tier: nothing about the
tier may keep a server from starting once its configuration was valid.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sgl_kvtier.config import TierConfig
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig, faults
from sgl_kvtier.tier.identity import model_identity
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import TierService

__all__ = ["open_tier", "rank_folder", "fingerprint"]

log = logging.getLogger("sgl_kvtier")

# Server arguments that change the KV computed by the same weights.
_KV_SETTINGS = ("dtype", "kv_cache_dtype", "quantization", "quantization_param_path",
                "json_model_override_args", "context_length", "tokenizer_path")


def rank_folder(ctx) -> str:
    """The sub-folder of ``tier.path`` for this process: one per rank that changes the KV
    (tensor, pipeline, context parallel). Data-parallel replicas share it."""
    params = ctx.params
    name = f"tp{ctx.tp_rank}-of-{ctx.tp_size}"
    if params.pp_size > 1:
        name += f"-pp{params.pp_rank}-of-{params.pp_size}"
    if params.attn_cp_size > 1:
        name += f"-cp{params.attn_cp_rank}-of-{params.attn_cp_size}"
    return name


def fingerprint(ctx, pool) -> ModelFingerprint:
    """What this process's KV bytes depend on: weights by content, KV dtype, rank, layers."""
    args = ctx.server_args
    settings = {name: getattr(args, name, None) for name in _KV_SETTINGS}
    identity = model_identity(args.model_path, str(getattr(args, "load_format", "auto")),
                              getattr(args, "revision", None), settings)
    start = getattr(pool, "start_layer", 0)
    return ModelFingerprint(
        model=identity, dtype=str(pool.store_dtype), kv_dtype=str(pool.dtype),
        num_layers=pool.layer_num, num_kv_heads=pool.head_num, head_dim=pool.head_dim,
        tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, pp_rank=ctx.params.pp_rank,
        pp_size=ctx.params.pp_size,
        layout=f"layer,kv,token,head,dim;layers={start}..{start + pool.layer_num}")


def open_tier(ctx, config: TierConfig) -> TierService | None:
    """This rank's tier, or ``None`` (one log line) when it cannot be opened."""
    root = Path(config.path).expanduser() / rank_folder(ctx)
    try:
        return _open(ctx, config, root)
    except Exception as e:  # any failure: the server starts without the tier
        log.error("sgl_kvtier: cannot use the NVMe tier at %s (%s); serving without it",
                  root, e, exc_info=not isinstance(e, OSError))
        return None


def _open(ctx, config: TierConfig, root: Path) -> TierService:
    faults.hit("open")
    if config.chunk_tokens % ctx.params.page_size:
        raise ValueError(f"tier.chunk_tokens ({config.chunk_tokens}) is not a multiple of "
                         f"the page size ({ctx.params.page_size})")
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    start = time.perf_counter()
    store = ChunkStore(StoreConfig.from_tier(config, root))
    try:
        tier = TierService(store, fingerprint(ctx, pool), config.chunk_tokens,
                           KVPool(list(pool.k_buffer), list(pool.v_buffer)))
    except BaseException:
        store.close()
        raise
    stats = store.stats()
    log.info("sgl_kvtier: NVMe tier at %s: %d chunks (%.2f GiB of %.2f GiB), opened in %.2f s; "
             "chunk %d tokens = %.1f MiB; admission %s; O_DIRECT %s%s%s", store.root,
             stats["chunks"], stats["used_bytes"] / 2**30, config.capacity / 2**30,
             time.perf_counter() - start, config.chunk_tokens, tier.layout.nbytes / 2**20,
             config.admission, "on" if stats["direct_io"] else "off",
             f"; reads capped at {config.read_bandwidth_limit / 1e6:.0f} MB/s"
             if config.read_bandwidth_limit else "",
             "" if stats["writes_enabled"] else "; READ-ONLY (see above)")
    return tier
