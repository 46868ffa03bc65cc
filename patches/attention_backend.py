"""The ``kvtier`` attention backend, registered in SGLang's attention registry.

Registration: ``sglang.srt.layers.attention.attention_registry.register_attention_backend``
and ``sglang.srt.arg_groups.choices.add_attention_backend_choices`` (SGLang 0.5.23).

On CPU it is SGLang's ``TorchNativeAttnBackend`` with the two per-request attention loops
replaced by :mod:`sgl_kvtier.attention.dense`: an extend attends only its new tokens to the
cached prefix instead of recomputing the whole ``seq_len x seq_len`` attention. Cases the
dense core does not cover (encoder-decoder, cross-attention, sliding windows, non-causal)
go to the inherited implementation unchanged. On a GPU the factory returns SGLang's
FlashInfer backend.
"""

from __future__ import annotations

import logging

from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
from sglang.srt.layers.attention.attention_registry import (
    ATTENTION_BACKENDS,
    register_attention_backend,
)
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sgl_kvtier.attention.dense import (
    contiguous_runs,
    decode_attention,
    decode_attention_runs,
    extend_attention,
)
from sgl_kvtier.patches.sparse_backend import SparseDecode, sparse_config

log = logging.getLogger("sgl_kvtier")
NAME = "kvtier"


class KVTierAttnBackend(SparseDecode, TorchNativeAttnBackend):
    """CPU path: prefix-aware extend; decode reads the KV pool in place, or, for long
    contexts with ``sparse.enabled``, attends a sparse state (``patches/sparse_backend.py``).
    """

    _decode_runs: list | None = None

    def __init__(self, model_runner):
        super().__init__(model_runner)
        # Per (request, layer) decode: attended in place (of which over several slot runs,
        # merging their states) or gathered (too fragmented, or a KV dtype cast needed);
        # per (request, step): sparse.
        self.stats = {"decode_in_place": 0, "decode_multi_run": 0, "decode_gathered": 0}
        if (config := sparse_config(model_runner)) is not None:
            self._sparse_init(model_runner, config)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        # Slot layout is the same for every layer: find each request's consecutive slot
        # ranges once per batch, so decode can attend to views instead of gathering the
        # whole context in every layer.
        self._decode_runs = None
        self._sparse_rows, self._sparse_step = [], None
        if forward_batch.forward_mode.is_decode() and forward_batch.encoder_lens is None:
            self._sparse_prepare(forward_batch)
            sparse = {i for i, _, _ in self._sparse_rows}
            table = self.req_to_token_pool.req_to_token
            self._decode_runs = [
                None if i in sparse else contiguous_runs(table[row, :total])
                for i, (row, total) in enumerate(zip(forward_batch.req_pool_indices.tolist(),
                                                     forward_batch.seq_lens.tolist()))]

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token,
                                 req_pool_indices, seq_lens, extend_prefix_lens,
                                 extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False,
                                 sliding_window_size=None):
        if encoder_lens is not None or not causal or sliding_window_size is not None:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa,
                causal, is_cross_attn, sliding_window_size)
        start = 0
        for row, total, prefix, n in zip(req_pool_indices.tolist(), seq_lens.tolist(),
                                         extend_prefix_lens.tolist(), extend_seq_lens.tolist()):
            k, v = self._gather(k_cache, v_cache, req_to_token[row, :total], query.dtype)
            output[start:start + n] = extend_attention(query[start:start + n], k, v, prefix,
                                                       scaling)
            start += n
        return output

    def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token,
                                 req_pool_indices, seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False,
                                 sliding_window_size=None):
        if encoder_lens is not None or sliding_window_size is not None:
            return super()._run_sdpa_forward_decode(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        runs = self._decode_runs
        if runs is None or len(runs) != seq_lens.shape[0]:
            runs = [None] * seq_lens.shape[0]
        sparse = self._sparse_decode(query, output, k_cache, v_cache, scaling)
        for i, (row, total) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            if i in sparse:
                continue
            if _covers(runs[i], total) and k_cache.dtype == query.dtype:
                output[i:i + 1] = decode_attention_runs(query[i:i + 1], k_cache, v_cache,
                                                        runs[i], scaling)
                self.stats["decode_in_place"] += 1
                self.stats["decode_multi_run"] += len(runs[i]) > 1
                continue
            self.stats["decode_gathered"] += 1
            k, v = self._gather(k_cache, v_cache, req_to_token[row, :total], query.dtype)
            output[i:i + 1] = decode_attention(query[i:i + 1], k, v, scaling)
        return output

    @staticmethod
    def _gather(k_cache, v_cache, slots, dtype):
        k, v = k_cache[slots], v_cache[slots]
        return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))


def _covers(runs, total: int) -> bool:
    return runs is not None and sum(b - a for a, b in runs) == total


def _create(model_runner):
    if str(model_runner.device).startswith("cpu"):
        log.info("sgl_kvtier: attention backend kvtier: dense prefix-aware attention on CPU")
        return KVTierAttnBackend(model_runner)
    log.info("sgl_kvtier: attention backend kvtier: FlashInfer on %s", model_runner.device)
    return ATTENTION_BACKENDS["flashinfer"](model_runner)


def install() -> None:
    """Idempotent: registers the factory and the ``--attention-backend`` choice."""
    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    register_attention_backend(NAME)(_create)
