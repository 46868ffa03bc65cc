"""The attention-backend side of sparse decode (CPU path of the ``kvtier`` backend).

A mixin for :class:`KVTierAttnBackend`. Per decode batch (``init_forward_metadata``) it
converts the requests the tree made eligible once their first dense answer tokens are out
(``sparse.dense_answer_tokens``), copying their prompt's KV out of the pool
into the sparse state, and plans one :class:`SparseStep` for the batch's sparse rows. Per
layer it attends those rows over ``[sink | outliers | local | selected]`` (the step) and
over their decode tokens in the pool (``row[boundary:seq_len]``), merged; dense rows take
the usual path. A sparse row never reads ``row[:boundary]``: the tree may have evicted
those slots and given them to another request.
"""

from __future__ import annotations

import logging
import time

from sgl_kvtier.config import ConfigError
from sgl_kvtier.patches.sparse_bridge import bridge, install_bridge
from sgl_kvtier.sparse.backend import resolve_kernel, resolve_ops
from sgl_kvtier.sparse.decode import merge_tail
from sgl_kvtier.sparse.manager import SparseManager
from sgl_kvtier.sparse.model_fit import sparse_unfit_reason
from sgl_kvtier.sparse.rope import rotary_from_config

__all__ = ["SparseDecode", "sparse_config"]

log = logging.getLogger("sgl_kvtier")


class SparseDecode:
    """Attention-backend mixin; inert until :meth:`_sparse_init` installs a manager."""

    _sparse_rows: list[tuple[int, str, int]] = ()
    _sparse_tails: list = ()
    _sparse_step = None
    _layer_id = 0

    def _sparse_init(self, model_runner, config) -> None:
        hf = model_runner.model_config.hf_config.to_dict()
        if (why := sparse_unfit_reason(hf)) is not None:
            # The launch check reads config.json from the folder or the hub cache; a hub id
            # not downloaded before launch is only known here.
            raise ConfigError(f"sparse.enabled: cannot serve this model: {why}")
        pool = model_runner.token_to_kv_pool
        k0 = pool.get_key_buffer(0)
        _, heads, head_dim = k0.shape
        rotary = rotary_from_config(hf)
        name, attend = resolve_kernel(config.kernel, model_runner.device)
        ops = resolve_ops(config.kernel, model_runner.device)
        layers = pool.layer_num
        slots = config.workspace // (2 * layers * head_dim * k0.element_size())
        manager = SparseManager(config, rotary, layers, heads, head_dim, slots, k0.dtype,
                                k0.device, attend, ops)
        install_bridge(manager)
        log.info("sgl_kvtier: sparse decode on for contexts of %d+ tokens after %d dense "
                 "answer tokens: %s keys, chunks of %d tokens, kernel %s (scores and gathers: "
                 "%s), workspace %d slots (%.0f MiB), %d KV heads scored from exact keys",
                 config.min_context_tokens, config.dense_answer_tokens,
                 manager.config.keys, manager.config.chunk_tokens, name, ops.name, slots,
                 manager.workspace.nbytes() / 2**20,
                 sum(map(len, manager.exact_heads.values())))

    # ------------------------------------------------------------ per batch

    def _sparse_prepare(self, forward_batch) -> None:
        self._sparse_rows, self._sparse_step = [], None
        link = bridge()
        if link is None or not forward_batch.rids:
            return
        rows = forward_batch.req_pool_indices.tolist()
        lens = forward_batch.seq_lens.tolist()
        for i, rid in enumerate(forward_batch.rids):
            if link.boundary(rid) is None and (offer := link.take(rid, lens[i])) is not None:
                self._convert(link, rid, offer, rows[i])
            if (boundary := link.boundary(rid)) is not None:
                self._sparse_rows.append((i, rid, boundary))
        if self._sparse_rows:
            self._sparse_step = link.manager.step([rid for _, rid, _ in self._sparse_rows])
            # Each sparse row's decode tokens in the pool (the current one included: its
            # slot is in the table before the forward), the same in every layer.
            table = self.req_to_token_pool.req_to_token
            self._sparse_tails = [table[rows[i], boundary:lens[i]].long()
                                  for i, _, boundary in self._sparse_rows]
            self.stats["decode_sparse"] = self.stats.get("decode_sparse", 0) + len(
                self._sparse_rows)

    def _convert(self, link, rid: str, offer, row: int) -> None:
        pool = self.token_to_kv_pool
        slots = self.req_to_token_pool.req_to_token[row, :offer.boundary].long()
        read = lambda layer: (pool.get_key_buffer(layer)[slots],
                              pool.get_value_buffer(layer)[slots])
        start = time.perf_counter()
        if link.manager.convert(rid, offer.tokens, read, offer.scope, offer.budget):
            link.mark_converted(rid, offer.boundary)
            plan = link.manager.requests[rid].plan
            keys = "exact keys" if plan.exact_keys else f"rank-{plan.rank} keys"
            log.info("sgl_kvtier: sparse decode for %s: %d prompt tokens -> %s, %d of "
                     "%d chunks selected + %d dense tokens per KV head (%.0f ms)", rid,
                     offer.boundary, keys, plan.selected_chunks, plan.chunks,
                     plan.dense, 1000 * (time.perf_counter() - start))

    # ------------------------------------------------------------ per layer

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._layer_id = layer.layer_id
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

    def _sparse_decode(self, query, output, k_cache, v_cache, scaling) -> set[int]:
        """Attend the sparse rows into ``output``; returns their batch indices."""
        if self._sparse_step is None:
            return set()
        index = [i for i, _, _ in self._sparse_rows]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out, lse = self._sparse_step.run(self._layer_id, query[index], scale)
        for j, (i, slots) in enumerate(zip(index, self._sparse_tails)):
            k, v = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
            merged = merge_tail(query[i], (out[j], lse[j]), k.to(query.dtype),
                                v.to(query.dtype), scale)
            output[i] = merged.to(output.dtype)
        return set(index)


def sparse_config(model_runner):
    """The ``sparse`` section when sparse decode applies to this runner, else None."""
    from sgl_kvtier.patches._state import config_of

    config = config_of(model_runner.server_args)
    if config is None or not config.sparse.enabled:
        return None
    return config.sparse

