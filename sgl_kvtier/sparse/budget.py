"""Turn the relative ``sparse`` settings into numbers for one model and one context.

ShadowKV states its sizes for Llama-3-8B at 128k: rank 160 of 1,024 key dimensions per
layer, 2,048 selected tokens (1.56 %), 48 outlier chunks of 8. A 135M model with 3 KV heads
of 64 has 192 key dimensions, and a 4k context is a 32nd of 128k, so the same absolute
numbers would keep every dimension and select most of the context. Fractions with floors
and caps carry the method across shapes; the floors are what a small context needs to keep
a needle's chunk among the candidates at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgl_kvtier.config import SparseConfig

__all__ = ["SparsePlan", "plan_for", "ALIGN_CHUNKS"]

ALIGN_CHUNKS = 16


@dataclass(frozen=True)
class SparsePlan:
    """Sizes of one request's sparse state (all in tokens unless named otherwise).

    The prompt of ``context`` tokens splits into ``[sink | middle | local]``; the middle is
    ``chunks`` chunks of ``chunk`` tokens. Per KV head per step, ``selected_chunks`` of the
    middle are attended besides the ``outlier_chunks`` kept dense. ``rank`` is that of the
    low-rank keys, 0 with exact keys (``keys: exact``).
    """

    context: int
    chunk: int
    sink: int
    local: int
    chunks: int
    rank: int
    selected_chunks: int
    outlier_chunks: int

    @property
    def exact_keys(self) -> bool:
        """The middle's keys are held exact (``keys: exact``), not as low-rank factors."""
        return self.rank == 0

    @property
    def middle(self) -> int:
        return self.chunks * self.chunk

    @property
    def selected(self) -> int:
        """Tokens selected per KV head per step."""
        return self.selected_chunks * self.chunk

    @property
    def dense(self) -> int:
        """Prompt tokens each KV head attends densely (sink, outliers and local window)."""
        return self.sink + self.outlier_chunks * self.chunk + self.local

    @property
    def attended(self) -> int:
        """Prompt tokens attended per KV head per step (selected and dense)."""
        return self.selected + self.dense

    @property
    def shared(self) -> int:
        """Tokens the shareable state covers (sink and middle); the local window is the
        request's own."""
        return self.sink + self.middle


def plan_for(config: SparseConfig, context: int, num_kv_heads: int, head_dim: int) -> SparsePlan:
    """Sizes for a prompt of ``context`` tokens on a model with ``num_kv_heads x head_dim``.

    The local window is at least ``local_tokens`` and takes what does not fill whole
    groups of :data:`ALIGN_CHUNKS` chunks. Raises ``ValueError`` when the context leaves
    no middle chunk to select from.
    """
    if not config.is_resolved:
        raise ValueError("sparse settings keys/chunk_tokens are left to the device: plan with "
                         "SparseConfig.resolved(device)")
    c = config.chunk_tokens
    sink = min(config.sink_tokens, context)
    # The middle ends on a multiple of ALIGN_CHUNKS chunks, so prompts that share a
    # document and differ in a short question share the state of the document.
    align = c * ALIGN_CHUNKS
    chunks = max(context - sink - config.local_tokens, 0) // align * align // c
    local = context - sink - chunks * c
    if chunks == 0:
        raise ValueError(f"a {context}-token context has no chunk between its "
                         f"{sink} sink and {local} local tokens")
    width = num_kv_heads * head_dim
    rank = (0 if config.keys == "exact" else
            min(width, chunks * c, max(config.rank_min, math.ceil(config.rank_fraction * width))))
    budget = min(max(config.budget_fraction * context, config.budget_min_tokens),
                 config.budget_max_tokens)
    outliers = min(chunks, max(config.outlier_min_chunks,
                               math.ceil(config.outlier_fraction * chunks)))
    selected = min(chunks - outliers, math.ceil(budget / c))
    return SparsePlan(context=context, chunk=c, sink=sink, local=local, chunks=chunks,
                      rank=rank, selected_chunks=selected, outlier_chunks=outliers)
