"""FlashInfer's batch decode over the sparse page table (GPU only).

The rows of :class:`PageTable` are (request, KV head) pairs, so the wrapper is planned with
one KV head and the ``G`` query heads of a group; the workspace buffers ``(slots, D)`` are
viewed as NHD pages ``(slots / page_size, page_size, 1, D)`` without a copy. A step plans
once (the table is the same object for every layer) and runs per layer.

FlashInfer returns its log-sum-exp in base 2; it is converted to the natural log the rest
of the project merges with.
"""

from __future__ import annotations

import math

import torch

from sgl_kvtier.sparse.paged import PageTable

__all__ = ["FlashInferDecode"]

_WORKSPACE_BYTES = 128 * 2**20
# Group sizes FlashInfer's CUDA-core decode kernel is built for; other sizes take the
# tensor-core path (a prefill kernel, which also compiles far longer on first use).
_CUDA_CORE_GROUPS = (1, 2, 3, 4, 6, 8, 16)


class FlashInferDecode:
    """A :data:`~sgl_kvtier.sparse.decode.PagedAttention` backed by FlashInfer.

    Parameters
    ----------
    device : torch.device
        A CUDA device.
    """

    def __init__(self, device: torch.device):
        import flashinfer  # imported here: its import costs ~2 s and a GPU is needed anyway

        self._flashinfer = flashinfer
        self._buffer = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers: dict[bool, object] = {}
        self._planned: tuple | None = None
        self._table: PageTable | None = None  # held: a new table never takes its id

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table: PageTable, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``q (R, G, D)``, ``k_cache/v_cache (slots, D)`` -> ``out (R, G, D)``, ``lse (R, G)``,
        float32."""
        r, g, d = q.shape
        key = (g, d, q.dtype, k_cache.dtype, scale)
        wrapper = self._wrapper(g)
        if self._table is not table or self._planned != key:
            wrapper.plan(table.indptr, table.indices, table.last_page_len,
                         num_qo_heads=g, num_kv_heads=1, head_dim=d,
                         page_size=table.page_size, q_data_type=q.dtype,
                         kv_data_type=k_cache.dtype, sm_scale=scale)
            self._planned, self._table = key, table
        p = table.page_size
        pages = (k_cache.view(-1, p, 1, d), v_cache.view(-1, p, 1, d))
        out, lse = wrapper.run(q, pages, return_lse=True)
        return out.float(), lse.float() * math.log(2.0)

    def _wrapper(self, group: int):
        tensor_cores = group not in _CUDA_CORE_GROUPS
        if tensor_cores not in self._wrappers:
            self._wrappers[tensor_cores] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._buffer, "NHD", use_tensor_cores=tensor_cores)
        return self._wrappers[tensor_cores]
